"""Low-resolution-image conditioning for super-resolution (LDM paper §4.4), with noise augmentation.

Two conditioners read the same field (``lowres`` by default):

- ``lowres`` (channels route): the low-resolution RGB image → values in [-1, 1] → noise augmentation
  ``x' = x + s·ε`` (``ε ~ N(0, I)``, ``s`` the noise level: the standard deviation of Gaussian noise in
  [-1, 1] image units) → resized to the latent size (identity when the sizes already agree; bicubic
  when upsampling, area when downsampling) → a small learned conv encoder → ``channels`` channels,
  concatenated to ``z_t``;
- ``noise_level`` (vector route): the same level ``s``, Fourier features + MLP, added to the timestep
  embedding — as the paper's SR model and later cascades (Ho et al. 2021's conditioning augmentation,
  the SD x4 upscaler's ``noise_level``) do, so the model knows how much to trust its input.

**Value.** One sample's value is an ``h x w x 3`` uint8 RGB array (integers 0..255; a torch tensor or
nested lists are accepted too; ``--cond lowres=@small.png``), or a dict ``{"image": array,
"noise_level": s}`` with ``0 <= s <= max_noise_level``.

**Size.** ``h x w = latent_hw x downsample_factor / lowres_factor``: the size of the image being
generated now, divided by ``lowres_factor`` (config, default 4: the shapes world's ``lowres`` is the
image area-averaged over 4x4 blocks). A 32x32 model with f = 4 takes 8x8 images (exactly the latent
size); sampling it at 2x (64x64) takes 16x16 images.

**The level s.** From the dict when given. For a bare array: in training mode (``self.training``) a level
drawn uniformly from ``[0, max_noise_level]`` by a hash of the image's bytes and ``torch.initial_seed()``
(which ldmkit's trainer reseeds at every step, so each image gets a fresh level per step and resumed runs
stay exact); in eval mode (sampling, evaluation) ``sample_noise_level`` (default 0). The noise ``ε`` is
seeded by the same hash, so it depends on nothing but the sample. Both conditioners compute ``s`` from the
same value the same way, so they agree without sharing state — **give both the same**
``max_noise_level`` **and** ``sample_noise_level`` **in a model** (the config validator cannot see the
other conditioner).

**Nulls.** ``lowres``: one learned vector of ``channels`` values broadcast to ``latent_hw``;
``noise_level``: a learned vector. Drop them together with a dropout group
(``dropout_groups: [{names: [lowres, noise_level], p: 0.1}]``).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
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

__all__ = ["LowresConfig", "LowresConditioner", "NoiseLevelConfig", "NoiseLevelConditioner", "LOWRES_SPEC",
           "NOISE_LEVEL_SPEC", "ldmkit_conditioners", "noise_draw"]


class _NoiseLevels(ConditionerConfig):
    """The noise-augmentation settings both conditioners carry (keep them equal within a model)."""

    max_noise_level: float = Field(default=0.2, ge=0.0, le=1.0,
                                   description="training draws s ~ U[0, max_noise_level] for a bare image")
    sample_noise_level: float = Field(default=0.0, ge=0.0, le=1.0,
                                      description="s used in eval mode (sampling) for a bare image")

    @model_validator(mode="after")
    def _levels(self) -> "_NoiseLevels":
        if self.sample_noise_level > self.max_noise_level:
            raise ValueError(f"sample_noise_level ({self.sample_noise_level}) must be <= max_noise_level "
                             f"({self.max_noise_level}): the model only sees levels up to max_noise_level in training")
        return self


class LowresConfig(_NoiseLevels):
    """Config of the ``lowres`` conditioner."""

    type: Literal["lowres"] = "lowres"
    key: str = "lowres"
    lowres_factor: int = Field(default=4, ge=1, description="image size / low-res image size")
    channels: int = Field(default=8, ge=1, description="output channels C (concatenated to z_t)")
    hidden_dim: int = Field(default=64, ge=1, description="width of the encoder's hidden layer")


class NoiseLevelConfig(_NoiseLevels):
    """Config of the ``noise_level`` conditioner."""

    type: Literal["noise_level"] = "noise_level"
    key: str = "lowres"
    dim: int = Field(default=128, ge=1, description="output vector width")
    num_frequencies: int = Field(default=8, ge=1, le=32, description="sin/cos frequencies pi * 2^k, k < num_frequencies")


# -- input ---------------------------------------------------------------------------------------

def _allowed(levels: _NoiseLevels, size: tuple[int, int] | None) -> str:
    shape = f"{size[0]} x {size[1]} x 3" if size else "h x w x 3"
    return (f"an RGB image, {shape} uint8 (integers 0..255), or {{\"image\": that image, \"noise_level\": a number "
            f"in [0, {levels.max_noise_level}]}}")


def parse_value(value: Any, key: str, index: int | None, levels: _NoiseLevels,
                size: tuple[int, int] | None = None) -> tuple[np.ndarray, float | None]:
    """One sample's value → ``(h x w x 3 uint8 image, noise level or None)``; ConditionInputError otherwise."""
    allowed = _allowed(levels, size)
    level = None
    if isinstance(value, Mapping):
        extra = sorted(str(k) for k in value if k not in ("image", "noise_level"))
        if extra or "image" not in value:
            problem = f"unknown key(s) {', '.join(extra)}" if extra else "missing 'image'"
            raise ConditionInputError(key, problem, allowed, index)
        level = value.get("noise_level")
        if level is not None:
            if isinstance(level, torch.Tensor) and level.numel() == 1:
                level = level.item()
            if isinstance(level, bool) or not isinstance(level, numbers.Real) or not math.isfinite(float(level)):
                raise ConditionInputError(key, f"noise_level must be a number, got {level!r}", allowed, index)
            level = float(level)
            if not 0.0 <= level <= levels.max_noise_level:
                raise ConditionInputError(key, f"noise_level {level} is outside [0, {levels.max_noise_level}]",
                                          allowed, index)
        value = value["image"]
    arr = as_array(value)
    if arr is None:
        what = "ragged or mixed nested lists" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ConditionInputError(key, f"expected an RGB image array, got {what}", allowed, index)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        extra = ""
        if arr.ndim == 3 and arr.shape[-1] == 4:
            extra = " (RGBA: drop the alpha channel)"
        elif arr.ndim == 3 and arr.shape[0] == 3:
            extra = " (channels first? give h x w x 3)"
        raise ConditionInputError(key, f"expected h x w x 3 (RGB), got shape {tuple(arr.shape)}{extra}", allowed, index)
    if arr.dtype.kind == "f":
        problem = "the image contains NaN or inf" if not np.isfinite(arr).all() else f"dtype {arr.dtype}"
        raise ConditionInputError(key, f"{problem}; pixel values must be integers 0..255", allowed, index)
    if arr.dtype.kind not in "iu":
        raise ConditionInputError(key, f"pixel values must be integers 0..255, got dtype {arr.dtype}", allowed, index)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise ConditionInputError(key, f"pixel values span {int(arr.min())}..{int(arr.max())}, outside 0..255",
                                  allowed, index)
    if size is not None and tuple(arr.shape[:2]) != tuple(size):
        raise ConditionInputError(
            key, f"the image is {arr.shape[0]} x {arr.shape[1]}, but the model takes {size[0]} x {size[1]} now "
                 "(the size being generated / lowres_factor)", allowed, index)
    return np.ascontiguousarray(arr, dtype=np.uint8), level


def noise_draw(image: np.ndarray, salt: int | None) -> tuple[float, int]:
    """``(u in [0, 1), seed)``: a deterministic function of the image's bytes (and ``salt``)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(image.shape).encode())
    h.update(image.tobytes())
    if salt is not None:
        h.update(int(salt).to_bytes(8, "little", signed=False))
    digest = h.digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64, int.from_bytes(digest[8:], "little") >> 1


def _levels_and_seeds(module: Conditioner, values: list[tuple[np.ndarray, float | None]]) -> tuple[list[float], list[int]]:
    cfg = module.config
    salt = torch.initial_seed() % 2**64 if module.training else None
    levels, seeds = [], []
    for image, level in values:
        u, seed = noise_draw(image, salt)
        if level is None:
            level = u * cfg.max_noise_level if module.training else cfg.sample_noise_level
        levels.append(float(level))
        seeds.append(seed)
    return levels, seeds


# -- conditioners ------------------------------------------------------------------------------------
class LowresConditioner(Conditioner):
    """Low-res RGB → noise augmentation → resize to latent size → conv encoder → ``(B, channels, h, w)``."""

    route = Route.CHANNELS

    def __init__(self, config: LowresConfig, context: ConditionerContext | None):
        super().__init__(config, context or ConditionerContext())
        self.factor = self.context.downsample_factor
        self.output_dim = config.channels
        hd = config.hidden_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, hd, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hd, hd, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hd, config.channels, 3, padding=1),
        )
        self.null_map = nn.Parameter(torch.randn(config.channels) * 0.5)

    @property
    def lowres_size(self) -> tuple[int, int] | None:
        """``(h, w)`` the low-res image must have now, or None if the size is not a whole number."""
        h, w = (s * self.factor for s in self.latent_hw)
        k = self.config.lowres_factor
        return (h // k, w // k) if h % k == 0 and w % k == 0 else None

    def validate_one(self, value: Any, index: int) -> tuple[np.ndarray, float | None]:
        size = self.lowres_size
        if size is None:
            h, w = (s * self.factor for s in self.latent_hw)
            raise ConditionInputError(self.key, f"the model works at {h} x {w} pixels now, which lowres_factor "
                                                f"{self.config.lowres_factor} does not divide", None, index)
        return parse_value(value, self.key, index, self.config, size)

    def collate(self, values: list[tuple[np.ndarray, float | None]], device: torch.device) -> dict[str, torch.Tensor]:
        levels, seeds = _levels_and_seeds(self, values)
        images = torch.from_numpy(np.stack([v[0] for v in values])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        h, w = images.shape[-2:]
        noise = torch.stack([torch.randn(3, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return {"image": images.to(device), "noise": noise.to(device),
                "level": torch.tensor(levels, dtype=torch.float32, device=device)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> ConditionOutput:
        dtype = self.encoder[0].weight.dtype
        x = inputs["image"] + inputs["level"].view(-1, 1, 1, 1) * inputs["noise"]
        x = x.to(dtype)
        size = self.latent_hw
        if tuple(x.shape[-2:]) != tuple(size):
            upsampling = x.shape[-2] < size[0] or x.shape[-1] < size[1]
            x = F.interpolate(x, size=size, mode="bicubic" if upsampling else "area",
                              **({"align_corners": False} if upsampling else {}))
        return ConditionOutput(Route.CHANNELS, self.encoder(x))

    def null(self, batch_size: int) -> ConditionOutput:
        h, w = self.latent_hw
        return ConditionOutput(Route.CHANNELS, self.null_map.view(1, -1, 1, 1).expand(batch_size, -1, h, w))


class NoiseLevelConditioner(Conditioner):
    """The noise level ``s`` of the same value → Fourier features → MLP → ``(B, dim)`` on the vector route."""

    route = Route.VECTOR

    def __init__(self, config: NoiseLevelConfig, context: ConditionerContext | None):
        super().__init__(config, context or ConditionerContext())
        self.output_dim = config.dim
        freqs = 2.0 ** torch.arange(config.num_frequencies, dtype=torch.float32) * math.pi
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * config.num_frequencies, config.dim), nn.SiLU(),
                                 nn.Linear(config.dim, config.dim))
        self.null_vector = nn.Parameter(torch.randn(config.dim) * 0.5)

    def validate_one(self, value: Any, index: int) -> tuple[np.ndarray, float | None]:
        return parse_value(value, self.key, index, self.config)  # the lowres conditioner checks the size

    def collate(self, values: list[tuple[np.ndarray, float | None]], device: torch.device) -> torch.Tensor:
        levels, _ = _levels_and_seeds(self, values)
        return torch.tensor(levels, dtype=torch.float32, device=device)

    def forward(self, levels: torch.Tensor) -> ConditionOutput:
        scale = self.config.max_noise_level or 1.0
        t = (levels / scale).to(self.freqs.dtype)[:, None]  # 0..1
        angles = t * self.freqs[None, :]
        features = torch.cat([t, angles.sin(), angles.cos()], dim=1).to(self.null_vector.dtype)
        return ConditionOutput(Route.VECTOR, self.mlp(features))

    def null(self, batch_size: int) -> ConditionOutput:
        return ConditionOutput(Route.VECTOR, self.null_vector.unsqueeze(0).expand(batch_size, -1))


def _example(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


EXAMPLES = (_example(0), {"image": _example(1), "noise_level": 0.1}, {"image": _example(2), "noise_level": 0.2})

LOWRES_SPEC = ConditionerSpec(
    name="lowres",
    config_cls=LowresConfig,
    build=LowresConditioner,
    route=Route.CHANNELS,
    description="low-res RGB image -> noise augmentation -> resize to latent size -> conv -> channels",
    example_inputs=EXAMPLES,
)

NOISE_LEVEL_SPEC = ConditionerSpec(
    name="noise_level",
    config_cls=NoiseLevelConfig,
    build=NoiseLevelConditioner,
    route=Route.VECTOR,
    description="the low-res image's noise-augmentation level -> Fourier features -> vector",
    example_inputs=EXAMPLES,
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [LOWRES_SPEC, NOISE_LEVEL_SPEC]
