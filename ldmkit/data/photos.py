"""Photographs shipped inside scikit-image and scikit-learn (nothing is downloaded).

Sources (see :data:`PHOTOS`): scikit-image's ``skimage.data`` images that live in the wheel itself
(those that need ``pooch`` and a download -- ``eagle``, ``brain``, ``skin``, ``lily``, ``kidney``, ... --
are not used), and scikit-learn's ``load_sample_images`` (``china``, ``flower``). Licences: see
``skimage/data/README.txt`` (public domain / CC0 / CC-BY mostly) and scikit-learn's docs (the two
sample images are CC-BY). Grey photographs are returned as RGB with three equal channels.

Splits, disjoint by source photograph:

- ``train``: ``n`` random square crops (side log-uniform between 1/8 of the photo's shorter side and
  all of it, random position, random horizontal flip) of the training photographs, resized to
  ``size``. Crop ``i`` depends only on ``(seed, i)``, so the set is deterministic and random access is
  cheap.
- ``eval``: the held-out photographs (:data:`EVAL_PHOTOS`), each as its whole centre square resized to
  ``size`` plus the 3 x 3 tiles of that square: 10 fixed samples per photograph, independent of ``seed``.

Label: the photograph's index in :data:`PHOTOS`. Caption: a short description of the photograph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from ldmkit.data.base import Sample, SampleSequence

__all__ = ["PhotosDataset", "Photo", "PHOTOS", "EVAL_PHOTOS", "SPLITS", "load_photo"]

SPLITS = ("train", "eval")
EVAL_GRID = 3  # eval tiles per side of each held-out photograph's centre square


@dataclass(frozen=True)
class Photo:
    """One source photograph: ``name``, the package providing it (``"skimage"`` or ``"sklearn"``),
    and a caption."""

    name: str
    package: str
    caption: str


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "a portrait of an astronaut"),
    Photo("coffee", "skimage", "a cup of coffee"),
    Photo("chelsea", "skimage", "a tabby cat"),
    Photo("rocket", "skimage", "a rocket on its launch pad"),
    Photo("hubble_deep_field", "skimage", "galaxies in deep space"),
    Photo("immunohistochemistry", "skimage", "a stained tissue sample under a microscope"),
    Photo("retina", "skimage", "the back of a human eye"),
    Photo("motorcycle", "skimage", "a motorcycle in a workshop"),
    Photo("camera", "skimage", "a black and white photograph of a cameraman"),
    Photo("coins", "skimage", "a black and white photograph of old coins"),
    Photo("moon", "skimage", "a black and white photograph of the moon's surface"),
    Photo("grass", "skimage", "a black and white photograph of grass"),
    Photo("gravel", "skimage", "a black and white photograph of gravel"),
    Photo("brick", "skimage", "a black and white photograph of a brick wall"),
    Photo("clock", "skimage", "a black and white photograph of a clock"),
    Photo("china", "sklearn", "a chinese temple among trees"),
    Photo("flower", "sklearn", "a flower in close-up"),
)
#: The photographs never used for training (one colour object, one colour scene, one grey texture).
EVAL_PHOTOS = ("chelsea", "flower", "brick")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError as err:
            raise ImportError(
                "photos data needs the Python package scikit-image (pip install scikit-image)"
            ) from err
        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]  # the left view
        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as err:
            raise ImportError(
                "photos data needs the Python package scikit-learn (pip install scikit-learn)"
            ) from err
        return load_sample_image(f"{name}.jpg")

    return load


@cache
def load_photo(name: str) -> np.ndarray:
    """The photograph ``name`` (one of :data:`PHOTOS`) as ``H x W x 3`` uint8 RGB (read-only)."""
    photo = next((p for p in PHOTOS if p.name == name), None)
    if photo is None:
        raise ValueError(f"no photo {name!r}; available: {', '.join(p.name for p in PHOTOS)}")
    raw = np.asarray((_skimage if photo.package == "skimage" else _sklearn)(name)())
    if raw.ndim == 2:
        raw = np.repeat(raw[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(raw[:, :, :3], dtype=np.uint8)
    image.flags.writeable = False
    return image


def _crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray:
    pil = Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    if flip:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(pil, dtype=np.uint8)


class PhotosDataset(SampleSequence):
    """Crops of real photographs; train and eval never share a source photograph.

    Args:
        split: ``"train"`` (random crops of the training photographs) or ``"eval"`` (fixed tiles of
            the held-out photographs :data:`EVAL_PHOTOS`).
        size: output side in pixels, 8..512.
        seed: seeds the training crops (ignored by ``eval``).
        n: the number of training crops (``train`` only; ``eval`` always has 10 per held-out photograph).

    ``meta`` holds the source (``"skimage:astronaut"``), the crop box in source pixels
    ``[x0, y0, x1, y1]`` and whether the crop was flipped.
    """

    def __init__(self, split: str = "train", size: int = 32, seed: int = 0, n: int = 4096) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 512:
            raise ValueError(f"size must be an integer in 8..512; got {size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer; got {n!r}")
        self.split, self.size, self.seed = split, size, seed
        held_out = split == "eval"
        self.photo_ids = [i for i, p in enumerate(PHOTOS) if (p.name in EVAL_PHOTOS) == held_out]
        for i in self.photo_ids:  # load now, so a missing package fails here and not in a worker
            load_photo(PHOTOS[i].name)
        self.n = len(self.photo_ids) * (1 + EVAL_GRID**2) if held_out else n

    def __len__(self) -> int:
        return self.n

    _noun = "photo crops"

    def _sample(self, index: int) -> Sample:
        if self.split == "eval":
            photo_id, box, flip = self._eval_crop(index)
        else:
            photo_id, box, flip = self._train_crop(index)
        photo = PHOTOS[photo_id]
        return Sample(
            image=_crop_resize(load_photo(photo.name), box, self.size, flip),
            label=photo_id,
            caption=photo.caption,
            meta={"source": f"{photo.package}:{photo.name}", "crop": list(box), "flip": flip, "index": index},
        )

    def _train_crop(self, index: int) -> tuple[int, tuple[int, int, int, int], bool]:
        rng = np.random.default_rng([self.seed, index])
        photo_id = self.photo_ids[int(rng.integers(len(self.photo_ids)))]
        h, w = load_photo(PHOTOS[photo_id].name).shape[:2]
        short = min(h, w)
        side = int(round(math.exp(rng.uniform(math.log(short / 8), math.log(short)))))
        side = max(1, min(side, short))
        x0 = int(rng.integers(w - side + 1))
        y0 = int(rng.integers(h - side + 1))
        flip = bool(rng.integers(2))
        return photo_id, (x0, y0, x0 + side, y0 + side), flip

    def _eval_crop(self, index: int) -> tuple[int, tuple[int, int, int, int], bool]:
        per_photo = 1 + EVAL_GRID**2
        photo_id = self.photo_ids[index // per_photo]
        tile = index % per_photo
        h, w = load_photo(PHOTOS[photo_id].name).shape[:2]
        short = min(h, w)
        x0, y0 = (w - short) // 2, (h - short) // 2
        if tile == 0:  # the whole centre square
            return photo_id, (x0, y0, x0 + short, y0 + short), False
        row, col = divmod(tile - 1, EVAL_GRID)
        step = short // EVAL_GRID
        tx, ty = x0 + col * step, y0 + row * step
        return photo_id, (tx, ty, tx + step, ty + step), False

    def __repr__(self) -> str:
        return f"PhotosDataset(split={self.split!r}, size={self.size}, seed={self.seed}, n={self.n})"
