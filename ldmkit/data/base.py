"""The one record every ldmkit data set yields.

A :class:`Sample` carries an image and whatever ground truth its source knows. Conditioners read the
field named by their config's ``key``: one of the built-in fields (``label``, ``caption``, ``boxes``,
``segmentation``, ``lowres``, ``mask``) or a field a plugin declares (:class:`ldmkit.ConditionField`),
whose values live in ``Sample.fields`` or are derived from the sample (:func:`ldmkit.fields.sample_value`),
so one data set can feed any combination of conditioners.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

__all__ = ["Box", "Sample", "SampleSequence", "CONDITION_KEYS"]

#: The built-in ground-truth fields a Sample carries as attributes (plugins add more: ``Sample.fields``).
CONDITION_KEYS = ("label", "caption", "boxes", "segmentation", "lowres", "mask")


@dataclass(frozen=True)
class Box:
    """One labelled box; ``bbox`` is (x0, y0, x1, y1) normalized to 0..1, x to the right, y down."""

    label: str
    bbox: tuple[float, float, float, float]


@dataclass
class Sample:
    """An image (``H x W x 3`` uint8 RGB) and its optional ground truth.

    - ``label``: an integer class id (meaning documented by the data set);
    - ``caption``: a string;
    - ``boxes``: a list of :class:`Box`;
    - ``segmentation``: ``H x W`` integer class ids;
    - ``lowres``: a smaller ``h x w x 3`` uint8 copy of the image;
    - ``mask``: ``H x W`` bool, True where the image is unknown (to be inpainted);
    - ``meta``: free-form, JSON-serializable facts (seed, index, source, structured caption, ...);
    - ``fields``: values of plugin-declared condition fields, by field name (e.g. from a manifest line).
    """

    image: np.ndarray
    label: int | None = None
    caption: str | None = None
    boxes: list[Box] | None = None
    segmentation: np.ndarray | None = None
    lowres: np.ndarray | None = None
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        """The value stored under ``key``: ``image``, a built-in field, or ``fields[key]`` (None when absent).

        Stored values only; :func:`ldmkit.fields.sample_value` also derives plugin fields."""
        if key == "image" or key in CONDITION_KEYS:
            return getattr(self, key)
        if key == "meta":
            raise KeyError("'meta' is free-form and not a condition field; a plugin derives its field from it "
                           "(ConditionField.derive)")
        return self.fields.get(key)


class SampleSequence(Sequence[Sample]):
    """Base of the data sets: ``len()``, integer indexing (negative too) and slices.

    Subclasses implement ``__len__`` and ``_sample(index)`` for ``0 <= index < len(self)``, and name
    what they hold in ``_noun`` (used in the IndexError message).
    """

    _noun = "samples"

    def _sample(self, index: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self._sample(i) for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} {self._noun}")
        return self._sample(int(index) % n)
