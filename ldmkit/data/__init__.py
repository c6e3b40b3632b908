"""Data sets: the synthetic shapes world, real data shipped by packages, and your own files.

``load_dataset(name, split=..., size=..., seed=...)`` is the one entry point; every data set is a
``Sequence`` of :class:`~ldmkit.data.base.Sample`. Submodules are imported only when their data set is
used, so a missing optional package (scikit-learn, scikit-image) or font only matters then.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmkit.data.base import CONDITION_KEYS, Box, Sample

__all__ = ["Box", "Sample", "CONDITION_KEYS", "DATASETS", "dataset_options", "load_dataset"]

#: The built-in data sets and what they are (``folder:PATH`` and ``manifest:PATH`` / ``*.jsonl`` too).
DATASETS: dict[str, str] = {
    "shapes": "synthetic scenes of coloured shapes with every modality's ground truth",
    "emoji": "Noto Color Emoji renders captioned with their Unicode names (fonts-noto-color-emoji)",
    "digits": "scikit-learn's 8x8 handwritten digits, upscaled (scikit-learn)",
    "photos": "crops of the photographs shipped by scikit-image and scikit-learn",
}
_OWN_DATA_SPLITS = ("train", "all")


def _dataset_class(name: str) -> Any:
    from importlib import import_module

    module, cls = _CLASSES[name].rsplit(".", 1)
    return getattr(import_module(module), cls)


#: The class behind each built-in data set (its keyword arguments besides split/size/seed are its options;
#: deterministic sets take no seed).
_CLASSES: dict[str, str] = {
    "shapes": "ldmkit.data.shapes.ShapesWorld",
    "emoji": "ldmkit.data.emoji.EmojiDataset",
    "digits": "ldmkit.data.digits.DigitsDataset",
    "photos": "ldmkit.data.photos.PhotosDataset",
}


def dataset_options(name: str) -> tuple[str, ...]:
    """The extra keyword options a built-in data set takes (``load_dataset(name, ..., **options)``)."""
    import inspect

    return tuple(p for p in inspect.signature(_dataset_class(name).__init__).parameters
                 if p not in ("self", "split", "size", "seed"))


def _build(name: str, split: str, size: int | None, seed: int, kw: dict[str, Any]) -> Sequence[Sample]:
    """Check ``kw`` against the data set's options, then make it (``seed`` only for the random ones)."""
    import inspect

    options = dataset_options(name)
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ValueError(f"data set {name!r} has no option {unknown[0]!r}; its options: {', '.join(options) or 'none'}")
    cls = _dataset_class(name)
    seeded = "seed" in inspect.signature(cls.__init__).parameters
    return cls(split=split, size=size, **({"seed": seed} if seeded else {}), **kw)


def load_dataset(
    name: str | os.PathLike[str], *, split: str = "train", size: int | None = 32, seed: int = 0, **kw: Any
) -> Sequence[Sample]:
    """Open a data set by name.

    Args:
        name: one of :data:`DATASETS`, ``folder:PATH`` (a folder of images), ``manifest:PATH`` or a path
            ending in ``.jsonl`` (a JSONL manifest, see :mod:`ldmkit.data.manifest`).
        split: the data set's split (``train``/``eval`` everywhere; ``all`` for emoji and digits; the
            shapes world adds ``train-text`` and ``eval-heldout``). Your own data has a single split:
            ``train`` or ``all`` (both mean every image); keep evaluation images in a separate manifest.
        size: image side in pixels (``None`` keeps your own images' sizes; built-in sets need an int).
        seed: seeds random data sets (shapes, photos); deterministic ones ignore it.
        **kw: passed on to the data set (``n=`` for photos, ``length=`` and ``only_captioned=`` for shapes, ``font_path=`` for
            emoji, ``skip_invalid=``/``fit=`` for a manifest, ``fit=``/``recursive=`` for a folder).
    """
    text = os.fspath(name)
    kind, _, rest = text.partition(":")
    if kind in ("folder", "manifest") and rest:
        path = rest
    elif text.endswith(".jsonl"):
        kind, path = "manifest", text
    elif text in _CLASSES:
        return _build(text, split, size, seed, kw)
    else:
        allowed = ", ".join([*DATASETS, "folder:PATH", "manifest:PATH", "PATH.jsonl"])
        raise ValueError(f"unknown data set {text!r}; allowed: {allowed}")
    if split not in _OWN_DATA_SPLITS:
        raise ValueError(
            f"split must be one of {', '.join(_OWN_DATA_SPLITS)} for your own data (a folder or manifest "
            f"is one split; use a separate one for evaluation); got {split!r}"
        )
    from ldmkit.data.manifest import FolderDataset, ManifestDataset

    if kind == "folder":
        return FolderDataset(Path(path), size=size, **kw)
    return ManifestDataset(Path(path), size=size, **kw)
