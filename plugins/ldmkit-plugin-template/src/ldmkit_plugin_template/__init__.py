"""A complete, minimal ldmkit plugin: one conditioner mapping a number in a range to a vector.

Copy this distribution, rename ``scalar`` / ``ldmkit_plugin_template`` and change the four methods of
:class:`ScalarConditioner`. It imports only ldmkit's public API (``from ldmkit import ...``).

The conditioner embeds a number ``x`` in ``[low, high]`` with Fourier features (sin/cos at
``num_frequencies`` octaves) followed by a small MLP, and returns it on the ``vector`` route (added to
the UNet's timestep embedding). Its null — used for classifier-free guidance and condition dropout —
is a learned vector.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ldmkit import (
    Conditioner,
    ConditionerConfig,
    ConditionerSpec,
    ConditionInputError,
    ConditionOutput,
    Route,
    hookimpl,
)

__all__ = ["ScalarConfig", "ScalarConditioner", "SPEC", "ldmkit_conditioners"]


class ScalarConfig(ConditionerConfig):
    """Config of the ``scalar`` conditioner."""

    type: Literal["scalar"] = "scalar"
    key: str = "scalar"
    low: float = 0.0
    high: float = 1.0
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
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
