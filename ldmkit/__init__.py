"""ldmkit: latent diffusion models where every conditioning modality is a plugin.

The public API — what plugins and applications import — is listed in ``__all__``. Names are loaded
lazily so that ``import ldmkit`` (and ``ldmkit --version``) stays fast and loads no plugin.
"""

from __future__ import annotations

import importlib
from typing import Any

from ldmkit._threads import choose_wait_policy

# How OpenMP threads wait: a short spin on free cores, passive when the machine is busy (see ldmkit/_threads.py).
# Only effective when ldmkit is imported before torch (the `ldmkit` command, the test suite); never overrides a
# setting. What was chosen, and why, is in ldmkit.WAIT_POLICY.
WAIT_POLICY = choose_wait_policy()

__version__ = "0.1.0"

_EXPORTS = {
    # the τθ contract
    "Route": "ldmkit.types",
    "ConditionOutput": "ldmkit.types",
    "ConditionerConfig": "ldmkit.types",
    "ConditionerContext": "ldmkit.types",
    "ConditionerSpec": "ldmkit.types",
    "ConditionInputError": "ldmkit.types",
    "ConditionField": "ldmkit.types",
    "normalize_name": "ldmkit.types",
    "hookimpl": "ldmkit.hookspecs",
    # composition
    "Conditioner": "ldmkit.conditioning",
    "ConditioningStack": "ldmkit.conditioning",
    "StackConfig": "ldmkit.conditioning",
    "StackOutput": "ldmkit.conditioning",
    "UNetWiring": "ldmkit.conditioning",
    "DropoutGroup": "ldmkit.conditioning",
    # registry and configs
    "get_registry": "ldmkit.registry",
    "load_config": "ldmkit.config",
    "LatentDiffusionConfig": "ldmkit.config",
    "ConfigError": "ldmkit.config",
    "build_stack": "ldmkit.wiring",
    "load": "ldmkit.api",
    "describe_wiring": "ldmkit.wiring",
    # data: what a field's derive() receives, and the shapes world's vocabulary
    "Sample": "ldmkit.data.base",
    "as_array": "ldmkit.fields",
    "Box": "ldmkit.data.base",
    "SHAPES": "ldmkit.data.shapes",
    "COLOURS": "ldmkit.data.shapes",
    "PALETTE": "ldmkit.data.shapes",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
