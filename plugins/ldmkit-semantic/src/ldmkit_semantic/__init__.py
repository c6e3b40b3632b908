"""Semantic-map conditioning (LDM paper §4.3.2, semantic synthesis): a class map → channels at latent size.

Each sample's value (batch field ``segmentation`` by default) is an ``H x W`` map of integer class ids in
``0..num_classes-1`` — a numpy array, a torch tensor, nested lists (JSON: ``--cond segmentation=@map.json``)
or a greyscale/palette PNG whose pixel values are the ids (``--cond segmentation=@map.png``). The
shapes world's maps have 19 classes: 0 = background, ``class_id + 1`` for its 18 object classes.

**Size.** The map is at image resolution: ``H x W = latent_hw x downsample_factor``, i.e. the size of the
image being generated *now* — 32x32 for a 32x32 model with f = 4, 64x64 when that model samples at 2x
(``ldmkit sample --height 64 --width 64``, convolutional sampling, paper §4.3.2).

**Encoder.** The map is one-hot encoded and a small learned encoder maps it to ``channels`` channels at
latent size: a ``f x f`` convolution with stride ``f`` (a lossless patch embedding of the one-hot map,
``f = context.downsample_factor``), then two 3x3 convolutions with SiLU. The paper concatenates the
(downsampled) map to ``z_t``; a learned encoder keeps sub-latent-pixel boundaries instead of averaging
them away.

**Null** (guidance, condition dropout): a learned "unknown map", one learned vector of ``channels``
values broadcast to ``latent_hw`` (so it is built at whatever size the model works at).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ldmkit import (
    Conditioner,
    ConditionerConfig,
    ConditionerContext,
    ConditionerSpec,
    ConditionInputError,
    ConditionOutput,
    Route,
    as_array,
    hookimpl,
)

__all__ = ["SemanticConfig", "SemanticConditioner", "SPEC", "ldmkit_conditioners", "as_class_map"]


class SemanticConfig(ConditionerConfig):
    """Config of the ``semantic`` conditioner."""

    type: Literal["semantic"] = "semantic"
    key: str = "segmentation"
    num_classes: int = Field(default=19, ge=1, le=4096,
                             description="class ids are 0..num_classes-1 (the shapes world: 19, 0 = background)")
    channels: int = Field(default=8, ge=1, description="output channels C (concatenated to z_t)")
    hidden_dim: int = Field(default=64, ge=1, description="width of the encoder's hidden layers")



def as_class_map(value: Any, key: str, index: int | None, num_classes: int,
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """``value`` checked as an ``H x W`` map of class ids in ``0..num_classes-1`` (of size ``size`` when
    given), returned as int64; :class:`ConditionInputError` naming ``key`` otherwise."""
    shape_text = f"{size[0]} x {size[1]}" if size else "H x W"
    allowed = f"a map of class ids, {shape_text} integers in 0..{num_classes - 1} (array, nested lists or greyscale PNG)"
    arr = as_array(value)
    if arr is None:
        what = type(value).__name__
        if isinstance(value, (list, tuple)):
            what = "ragged or mixed nested lists"
        raise ConditionInputError(key, f"expected a 2-D map of class ids, got {what}", allowed, index)
    if arr.ndim != 2:
        hint = ""
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            hint = " (an RGB image? save the map as a greyscale or palette PNG whose pixel values are the class ids)"
        raise ConditionInputError(key, f"expected a 2-D map, got shape {tuple(arr.shape)}{hint}", allowed, index)
    if arr.dtype.kind == "b":
        raise ConditionInputError(key, "got a bool map, not class ids", allowed, index)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ConditionInputError(key, "the map contains NaN or inf", allowed, index)
        raise ConditionInputError(key, f"class ids must be integers, got dtype {arr.dtype}", allowed, index)
    if arr.dtype.kind not in "iu":
        raise ConditionInputError(key, f"class ids must be integers, got dtype {arr.dtype}", allowed, index)
    if size is not None and tuple(arr.shape) != tuple(size):
        raise ConditionInputError(
            key, f"the map is {arr.shape[0]} x {arr.shape[1]}, but the model works at {size[0]} x {size[1]} "
                 "pixels now (the image size being generated)", allowed, index)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ConditionInputError(key, f"class id {bad} is out of range", allowed, index)
    return np.ascontiguousarray(arr, dtype=np.int64)


class SemanticConditioner(Conditioner):
    """``(B, H, W)`` class ids → one-hot → patch conv (stride f) → 2 convs → ``(B, channels, h, w)``."""

    route = Route.CHANNELS

    def __init__(self, config: SemanticConfig, context: ConditionerContext | None):
        super().__init__(config, context or ConditionerContext())
        f = self.context.downsample_factor
        if f < 1 or self.context.image_size != f * self.context.latent_size:
            raise ValueError(f"semantic: image_size {self.context.image_size} must be a multiple of latent_size "
                             f"{self.context.latent_size}")
        self.factor = f
        self.output_dim = config.channels
        h = config.hidden_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(config.num_classes, h, kernel_size=f, stride=f),  # lossless patch embedding of the one-hot map
            nn.SiLU(),
            nn.Conv2d(h, h, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(h, config.channels, 3, padding=1),
        )
        self.null_map = nn.Parameter(torch.randn(config.channels) * 0.5)  # the learned "unknown" map

    @property
    def map_size(self) -> tuple[int, int]:
        """The ``(H, W)`` an input map must have now: the latent size times the downsampling factor."""
        h, w = self.latent_hw
        return h * self.factor, w * self.factor

    def validate_one(self, value: Any, index: int) -> np.ndarray:
        return as_class_map(value, self.key, index, self.config.num_classes, self.map_size)

    def collate(self, values: list[np.ndarray], device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.stack(values)).to(device)

    def forward(self, ids: torch.Tensor) -> ConditionOutput:
        weight = self.encoder[0].weight
        onehot = F.one_hot(ids.long(), self.config.num_classes).permute(0, 3, 1, 2).to(weight.dtype)
        return ConditionOutput(Route.CHANNELS, self.encoder(onehot))

    def null(self, batch_size: int) -> ConditionOutput:
        h, w = self.latent_hw
        return ConditionOutput(Route.CHANNELS, self.null_map.view(1, -1, 1, 1).expand(batch_size, -1, h, w))


def _example(kind: int) -> np.ndarray:
    m = np.zeros((32, 32), np.int64)
    if kind == 0:
        m[4:14, 6:16] = 1  # a red circle's class id + 1
    elif kind == 1:
        m[16:30, 2:12] = 9
        m[3:10, 20:30] = 15
    else:
        m[10:22, 10:22] = 18
    return m


SPEC = ConditionerSpec(
    name="semantic",
    config_cls=SemanticConfig,
    build=SemanticConditioner,
    route=Route.CHANNELS,
    description="semantic map (H x W class ids) -> one-hot -> learned conv encoder -> channels at latent size",
    example_inputs=(_example(0), _example(1), _example(2)),
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
