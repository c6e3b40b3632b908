"""A complete, minimal ldmkit plugin: one conditioner mapping a number in a range to a vector.

Copy this distribution, rename ``scalar`` / ``ldmkit_plugin_template`` and change the four methods of
:class:`ScalarConditioner`. It imports only ldmkit's public API (``from ldmkit import ...``).

The conditioner embeds a number ``x`` in ``[low, high]`` with Fourier features (sin/cos at
``num_frequencies`` octaves) followed by a small MLP, and returns it on the ``vector`` route (added to
the UNet's timestep embedding). Its null — used for classifier-free guidance and condition dropout —
is a learned vector.

It also shows how a plugin brings its own data: it declares the condition field ``brightness`` (a
number in [0, 1]) and how to derive it from any sample (the image's mean intensity), so a model using
it trains on any data set — the shapes world, emoji, your own folder — and samples with
``--cond brightness=0.7``; a manifest may also store it per image (``{"image": ..., "brightness": 0.4}``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ldmkit import (
    ConditionField,
    Conditioner,
    ConditionerConfig,
    ConditionerSpec,
    ConditionInputError,
    ConditionOutput,
    Route,
    Sample,
    hookimpl,
)

__all__ = ["BRIGHTNESS", "ScalarConfig", "ScalarConditioner", "SPEC", "ldmkit_conditioners"]


def image_brightness(sample: Sample) -> float:
    """The mean intensity of a sample's image, in [0, 1] (3 decimals: a value a user could type)."""
    return round(float(sample.image.mean()) / 255.0, 3)


#: The field this plugin introduces: its name, the type of one value, and how to derive it.
BRIGHTNESS = ConditionField(
    name="brightness",
    value_type=Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)],
    derive=image_brightness,
    description="mean image intensity in [0, 1]",
    example=0.4,
)


class ScalarConfig(ConditionerConfig):
    """Config of the ``scalar`` conditioner."""

    type: Literal["scalar"] = "scalar"
    key: str = "brightness"
    low: float = Field(default=0.0, allow_inf_nan=False)
    high: float = Field(default=1.0, allow_inf_nan=False)
    dim: int = Field(default=64, ge=1, description="output vector width")
    num_frequencies: int = Field(default=8, ge=1, le=32)

    @model_validator(mode="after")
    def _range(self) -> "ScalarConfig":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class ScalarConditioner(Conditioner):
    """A number in ``[low, high]`` → Fourier features → MLP → a ``(B, dim)`` vector."""

    route = Route.VECTOR

    def __init__(self, config: ScalarConfig, context: Any):
        super().__init__(config, context)
        self.output_dim = config.dim
        freqs = 2.0 ** torch.arange(config.num_frequencies, dtype=torch.float32) * math.pi
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * config.num_frequencies, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim)
        )
        self.null_vector = nn.Parameter(torch.randn(config.dim) * 0.02)

    def validate_one(self, value: Any, index: int) -> float:
        cfg = self.config
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConditionInputError(self.key, f"expected a number, got {value!r}", f"a number in [{cfg.low}, {cfg.high}]", index)
        if not cfg.low <= value <= cfg.high:
            raise ConditionInputError(self.key, f"{value} is out of range", f"a number in [{cfg.low}, {cfg.high}]", index)
        return float(value)

    def collate(self, values: list[float], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    def forward(self, x: torch.Tensor) -> ConditionOutput:
        t = (x - self.config.low) / (self.config.high - self.config.low)  # to [0, 1]
        angles = t[:, None] * self.freqs[None, :]
        features = torch.cat([angles.sin(), angles.cos()], dim=1)
        return ConditionOutput(Route.VECTOR, self.mlp(features))

    def null(self, batch_size: int) -> ConditionOutput:
        return ConditionOutput(Route.VECTOR, self.null_vector.unsqueeze(0).expand(batch_size, -1))


SPEC = ConditionerSpec(
    name="scalar",
    config_cls=ScalarConfig,
    build=ScalarConditioner,
    route=Route.VECTOR,
    description="a number in [low, high] -> Fourier features -> vector",
    example_inputs=(0.0, 0.25, 0.9),
    fields=(BRIGHTNESS,),
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
