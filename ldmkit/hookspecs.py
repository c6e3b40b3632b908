"""ldmkit's hook specifications (pluggy project name ``ldmkit``).

The surface is deliberately small: one hook, :func:`ldmkit_conditioners`. Everything a conditioner
needs to declare travels in the typed :class:`~ldmkit.types.ConditionerSpec` it returns, and the core
validates every spec centrally (names, config classes, routes, duplicates across plugins).

How a plugin is found
---------------------
A distribution declares an entry point in the ``ldmkit`` group whose object is a module (or any
object) with hook implementations::

    # pyproject.toml of your distribution
    [project.entry-points.ldmkit]
    mymodality = "ldmkit_mymodality"

Built-in plugins under ``plugins/`` are registered exactly the same way. ``LDMKIT_DISABLE_PLUGINS=a,b``
blocks plugins by entry-point name; ``LDMKIT_STRICT_PLUGINS=1`` turns a failing plugin into an error.
"""

from __future__ import annotations

from typing import Iterable

import pluggy

from ldmkit.types import ConditionerSpec

PROJECT_NAME = "ldmkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["hookimpl", "hookspec", "PROJECT_NAME", "ldmkit_conditioners"]


@hookspec
def ldmkit_conditioners() -> Iterable[ConditionerSpec]:
    """Return the conditioners this plugin provides, as :class:`~ldmkit.types.ConditionerSpec` objects.

    Called once per plugin when the registry is built. Return an iterable (list, tuple, generator) of
    specs; return an empty list to provide nothing. Each spec's ``name`` must be unique across every
    installed plugin (a clash is an error naming both providers), and its ``config_cls`` must declare
    ``type: Literal[<name>]``. Raising here, or returning anything that is not a ``ConditionerSpec``,
    marks the plugin as *failed* (listed by ``ldmkit plugins`` with the error) without affecting the
    others. If another installed plugin provides the same name, both are listed as ``conflict`` and
    that one name is withheld: a config using it is refused (naming both providers and
    ``LDMKIT_DISABLE_PLUGINS``), everything else keeps working.

    A conditioner that reads a field the core does not know (built-in: ``label``, ``caption``,
    ``boxes``, ``segmentation``, ``lowres``, ``mask``) declares it in its spec's ``fields`` as a
    :class:`~ldmkit.types.ConditionField` — its name, the type of one value and, optionally, how to
    derive it from a data set's :class:`~ldmkit.Sample` — so that training data, manifests,
    ``ldmkit sample --cond NAME=...`` and ``model(NAME=...)`` all speak it (see the template plugin).

    A complete example plugin — a conditioner turning a brightness in [0, 1] into a vector::

        from typing import Literal
        import torch
        from torch import nn
        from ldmkit import (Conditioner, ConditionerConfig, ConditionerSpec, ConditionInputError,
                            ConditionOutput, Route, hookimpl)

        class BrightnessConfig(ConditionerConfig):
            type: Literal["brightness"] = "brightness"
            key: str = "brightness"
            dim: int = 32

        class Brightness(Conditioner):
            route = Route.VECTOR

            def __init__(self, config, context):
                super().__init__(config, context)
                self.output_dim = config.dim
                self.net = nn.Sequential(nn.Linear(1, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim))
                self.null_vector = nn.Parameter(torch.zeros(config.dim))

            def validate_one(self, value, index):
                # bool is an int subclass: refuse True/False explicitly
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                    raise ConditionInputError(self.key, f"got {value!r}", "a number in [0, 1]", index)
                return float(value)

            def collate(self, values, device):
                return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

            def forward(self, x):
                return ConditionOutput(Route.VECTOR, self.net(x))

            def null(self, batch_size):
                return ConditionOutput(Route.VECTOR, self.null_vector.expand(batch_size, -1))

        @hookimpl
        def ldmkit_conditioners():
            return [ConditionerSpec(name="brightness", config_cls=BrightnessConfig, build=Brightness,
                                    route=Route.VECTOR, description="brightness in [0, 1] -> vector",
                                    example_inputs=(0.0, 0.5, 1.0))]
    """
