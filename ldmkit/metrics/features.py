"""The small CNN whose features define the shapes-world Fréchet distance (``fd``).

Four 3x3 convolutions (16, 32, 64, 128 channels; the last three with stride 2) with ReLU, then global
average pooling give a 128-d feature. Three linear heads are trained on it: which of the 18
(shape, colour) classes are present (multi-label), the class of the largest object, and how strongly the
image was blurred and noised (training images are randomly degraded), so the features see both the
content of a scene and its rendering quality. ``scripts/train_fd_features.py`` trains it on the shapes
world's ``train`` split; the weights ship as ``ldmkit/metrics/assets/shapes_features.safetensors`` and
are loaded with safetensors only. Inputs of any size are area-resized to 32x32 first.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ldmkit.data.shapes import NUM_CLASSES

__all__ = ["FEATURE_DIM", "WEIGHTS_PATH", "ShapesFeatureNet", "load_feature_net", "extract_features", "to_input"]

FEATURE_DIM = 128
WEIGHTS_PATH = Path(__file__).parent / "assets" / "shapes_features.safetensors"
INPUT_SIZE = 32


class ShapesFeatureNet(nn.Module):
    """conv(3->16) -> conv/2(16->32) -> conv/2(32->64) -> conv/2(64->128) -> mean pool -> three linear heads
    (presence, largest class, degradation); only the pooled features are used for ``fd``."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: Sequence[int] = (16, 32, 64, FEATURE_DIM)):
        super().__init__()
        chans = (3, *width)
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1) for i in range(len(width))
        )
        self.presence = nn.Linear(width[-1], num_classes)  # which classes appear (multi-label logits)
        self.largest = nn.Linear(width[-1], num_classes)  # class of the largest object (softmax logits)
        self.degradation = nn.Linear(width[-1], 2)  # blur sigma / 2 and noise sigma / 30 (regression)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 32, 32)`` in [-1, 1] -> ``(B, FEATURE_DIM)``."""
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.presence(h), self.largest(h), self.degradation(h)


def to_input(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``N x H x W x 3`` images -> float ``(N, 3, 32, 32)`` in [-1, 1] (area-resized if needed)."""
    arr = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be N x H x W x 3 uint8, got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return x


@lru_cache(maxsize=4)
def load_feature_net(path: str | Path = WEIGHTS_PATH) -> ShapesFeatureNet:
    """The trained feature network in eval mode (cached per path)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no feature weights at {path}; train them with scripts/train_fd_features.py")
    net = ShapesFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def extract_features(images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 512,
                     path: str | Path = WEIGHTS_PATH) -> np.ndarray:
    """``N x FEATURE_DIM`` float64 features of uint8 images."""
    if len(images) == 0:
        raise ValueError("images must not be empty")
    net = load_feature_net(path)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(net.features(to_input(images[i:i + batch_size])).double().numpy())
    return np.concatenate(out)
