"""Handwritten digits: scikit-learn's ``load_digits`` (UCI optical recognition of handwritten digits).

1,797 grey 8 x 8 images (values 0..16) of the digits 0-9, about 180 per class, shipped inside
scikit-learn (BSD-3-Clause; the data are from the UCI ML repository). Each image is upscaled smoothly
(bicubic) to ``size x size`` and returned as RGB with dark ink on white paper.

Label: the digit. Caption: ``"the digit seven"``. Split: image ``i`` (in scikit-learn's order) belongs
to ``eval`` when ``i % 10 == 0`` (180 images), otherwise to ``train`` (1,617); ``all`` is all 1,797.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from ldmkit.data.base import Sample, SampleSequence

__all__ = ["DigitsDataset", "DIGIT_NAMES", "SPLITS"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "eval", "all")


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "digits data needs the Python package scikit-learn (pip install scikit-learn)"
        ) from err
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


class DigitsDataset(SampleSequence):
    """scikit-learn's 8 x 8 digits, upscaled to ``size x size`` RGB (dark ink on white).

    Args:
        split: ``"train"``, ``"eval"`` (every 10th image) or ``"all"``.
        size: output side in pixels, 8..512.
    """

    def __init__(self, split: str = "train", size: int = 32) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 512:
            raise ValueError(f"size must be an integer in 8..512; got {size!r}")
        self.split = split
        self.size = size
        images, targets = _load()
        every = np.arange(len(targets))
        if split == "all":
            self.indices = every
        else:
            self.indices = every[(every % 10 == 0) == (split == "eval")]
        self._images = images
        self._targets = targets

    def __len__(self) -> int:
        return len(self.indices)

    _noun = "digits"

    def _sample(self, index: int) -> Sample:
        source = int(self.indices[index])
        ink = self._images[source] / 16.0  # 0 = paper, 1 = full ink
        small = Image.fromarray(ink.astype(np.float32))  # mode "F"
        big = np.asarray(small.resize((self.size, self.size), Image.Resampling.BICUBIC))
        grey = np.clip(np.rint(255.0 * (1.0 - big)), 0, 255).astype(np.uint8)
        digit = int(self._targets[source])
        return Sample(
            image=np.repeat(grey[:, :, None], 3, axis=2),
            label=digit,
            caption=f"the digit {DIGIT_NAMES[digit]}",
            meta={"source": "digits", "index": source},
        )

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, size={self.size}, n={len(self)})"
