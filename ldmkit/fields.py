"""Condition fields: the names conditioners read from data — built in, or declared by plugins.

A conditioner's ``key`` names a *field*. The core's fields are attributes of
:class:`~ldmkit.data.base.Sample` (:data:`BUILTIN_FIELDS`); a plugin adds its own by returning
:class:`~ldmkit.types.ConditionField` objects in its :class:`~ldmkit.types.ConditionerSpec` (name, the
value's type, and optionally how to derive it from any sample). The data path asks this module for a
field's value, so training, evaluation and manifests treat built-in and plugin fields alike::

    from ldmkit.fields import sample_value
    sample_value(ShapesWorld("train")[0], "palette")   # stored in sample.fields, else derived, else None
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ldmkit.data.base import CONDITION_KEYS, Sample
from ldmkit.types import ConditionInputError

__all__ = ["BUILTIN_FIELDS", "UnknownFieldError", "known_fields", "sample_value", "check_keys", "as_array"]


def as_array(value: Any) -> np.ndarray | None:
    """A numpy view of an array-like field value (ndarray, tensor, PIL image, nested lists), or None if it is
    not one (a string, a dict, ragged lists): conditioners that take arrays check the result and raise their
    own :class:`~ldmkit.types.ConditionInputError` naming the field and the allowed forms."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)) or hasattr(value, "__array_interface__"):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):  # ragged nested lists
            return None
        return None if arr.dtype == object else arr
    return None


#: The core's condition fields and what one sample's value is.
BUILTIN_FIELDS: dict[str, str] = {
    "label": "an integer class id",
    "caption": "a string",
    "boxes": "a list of {label, bbox: [x0, y0, x1, y1] in 0..1}",
    "segmentation": "an H x W array of integer class ids",
    "lowres": "a smaller h x w x 3 uint8 image",
    "mask": "an H x W bool array, True where the image is to be inpainted",
}
assert tuple(BUILTIN_FIELDS) == CONDITION_KEYS


class UnknownFieldError(ValueError):
    """A conditioner reads a field that is neither built in nor declared by an installed plugin."""


def _registry(registry: Any) -> Any:
    if registry is None:
        from ldmkit.registry import get_registry

        registry = get_registry()
    return registry


def known_fields(registry: Any = None) -> dict[str, str]:
    """``{field name: description}``: the built-in fields, then every plugin-declared one."""
    registry = _registry(registry)
    out = dict(BUILTIN_FIELDS)
    for name, f in sorted(registry.fields.items()):
        out[name] = f"{f.description or 'declared'} (plugin {registry.field_providers[name]!r})"
    return out


def _unknown(key: str, registry: Any) -> Exception:
    from ldmkit.registry import ConditionerConflictError

    if key in registry.field_conflicts:
        return ConditionerConflictError(registry.field_conflict_message(key))
    declared = ", ".join(sorted(registry.fields)) or "(none)"
    return UnknownFieldError(
        f"no condition field {key!r}: built-in fields are {', '.join(BUILTIN_FIELDS)}; fields declared by "
        f"installed plugins: {declared} (a plugin declares a new field with ldmkit.ConditionField)"
    )


def sample_value(sample: Sample, key: str, registry: Any = None, index: int | None = None) -> Any:
    """The value of field ``key`` for ``sample``: stored (built-in attribute or ``sample.fields``), else
    derived by the declaring plugin (validated by the field's type), else None."""
    if key == "image" or key in CONDITION_KEYS:
        return sample.get(key)
    if key in sample.fields:
        return sample.fields[key]
    registry = _registry(registry)
    f = registry.fields.get(key)
    if f is None:
        raise _unknown(key, registry)
    if f.derive is None:
        return None
    where = f" for sample {index}" if index is not None else ""
    try:
        value = f.derive(sample)
    except Exception as exc:
        raise ValueError(
            f"field {key!r} (plugin {registry.field_providers[key]!r}): derive failed{where}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if value is None:
        return None
    try:
        return f.validate(value, index)
    except ConditionInputError as exc:  # the plugin's derive is at fault, not the user's data
        raise ValueError(f"field {key!r} (plugin {registry.field_providers[key]!r}): derive returned an invalid "
                         f"value{where}: {exc.problem}; allowed: {exc.allowed}") from None


def check_keys(readers: Mapping[str, Iterable[str]], registry: Any = None) -> None:
    """Every key in ``{key: [conditioner names]}`` must be a known field; else one error naming them all."""
    registry = _registry(registry)
    problems = []
    for key, names in readers.items():
        if key in CONDITION_KEYS or key in registry.fields:
            continue
        problems.append(f"conditioner(s) {', '.join(names)} read {key!r}: {_unknown(key, registry)}")
    if problems:
        raise UnknownFieldError("\n".join(problems))
