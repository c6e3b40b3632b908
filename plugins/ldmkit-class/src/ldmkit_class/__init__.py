"""Class-label conditioning (LDM paper §4.1/§4.3: ImageNet class-conditional models).

An integer label in ``0..num_classes-1`` is embedded with a learned table. ``route: tokens`` gives one
cross-attention token (the paper's ``ClassEmbedder`` with ``crossattn``); ``route: vector`` adds the
embedding to the timestep embedding (the "adm" variant). The null, used for guidance and condition
dropout, is an extra learned row (index ``num_classes``), as in CompVis' ``n_classes: 1001``.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ldmkit import Conditioner, ConditionerConfig, ConditionerSpec, ConditionInputError, ConditionOutput, Route, hookimpl

__all__ = ["ClassConfig", "ClassConditioner", "SPEC", "ldmkit_conditioners"]


class ClassConfig(ConditionerConfig):
    """Config of the ``class`` conditioner."""

    type: Literal["class"] = "class"
    key: str = "label"
    num_classes: int = Field(default=18, ge=1)
    dim: int = Field(default=128, ge=1, description="embedding width")
    route: Literal["tokens", "vector"] = "tokens"


class ClassConditioner(Conditioner):
    """Label → learned embedding, on the tokens (one token) or vector route."""

    def __init__(self, config: ClassConfig, context: Any):
        super().__init__(config, context)
        self.route = Route(config.route)
        self.output_dim = config.dim
        self.num_tokens = 1 if self.route is Route.TOKENS else None
        self.embedding = nn.Embedding(config.num_classes + 1, config.dim)  # last row = null class
        nn.init.normal_(self.embedding.weight, std=0.02)

    def validate_one(self, value: Any, index: int) -> int:
        allowed = f"an integer class id in 0..{self.config.num_classes - 1}"
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConditionInputError(self.key, f"expected an integer, got {value!r}", allowed, index)
        if not 0 <= int(value) < self.config.num_classes:
            raise ConditionInputError(self.key, f"class {value} is out of range", allowed, index)
        return int(value)

    def collate(self, values: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    def _output(self, ids: torch.Tensor) -> ConditionOutput:
        emb = self.embedding(ids)
        if self.route is Route.TOKENS:
            mask = torch.ones(ids.shape[0], 1, dtype=torch.bool, device=ids.device)
            return ConditionOutput(Route.TOKENS, emb[:, None, :], mask)
        return ConditionOutput(Route.VECTOR, emb)

    def forward(self, ids: torch.Tensor) -> ConditionOutput:
        return self._output(ids)

    def null(self, batch_size: int) -> ConditionOutput:
        ids = torch.full((batch_size,), self.config.num_classes, dtype=torch.long, device=self.embedding.weight.device)
        return self._output(ids)


SPEC = ConditionerSpec(
    name="class",
    config_cls=ClassConfig,
    build=ClassConditioner,
    route=(Route.TOKENS, Route.VECTOR),
    description="class label -> one token (cross-attention) or a vector (timestep embedding)",
    example_inputs=(0, 3, 17),
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
