"""Small conditioners for the core's tests: one per route, plus deliberately broken variants."""

from __future__ import annotations

from typing import Any, Literal

import torch
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


class WordsConfig(ConditionerConfig):
    type: Literal["words"] = "words"
    key: str = "words"
    vocab: int = 10
    max_len: int = 4
    dim: int = 8


class Words(Conditioner):
    """A list of word ids (length 1..max_len) → tokens, padded, with a key-padding mask."""

    route = Route.TOKENS

    def __init__(self, config: WordsConfig, context: Any):
        super().__init__(config, context)
        self.output_dim = config.dim
        self.num_tokens = config.max_len
        self.emb = nn.Embedding(config.vocab, config.dim)
        self.null_token = nn.Parameter(torch.randn(config.dim))

    def validate_one(self, value: Any, index: int) -> list[int]:
        allowed = f"a list of 1..{self.config.max_len} ints in 0..{self.config.vocab - 1}"
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= self.config.max_len:
            raise ConditionInputError(self.key, f"got {value!r}", allowed, index)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.config.vocab for v in value):
            raise ConditionInputError(self.key, f"got {value!r}", allowed, index)
        return list(value)

    def collate(self, values: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(values), self.config.max_len, dtype=torch.long, device=device)
        mask = torch.zeros(len(values), self.config.max_len, dtype=torch.bool, device=device)
        for i, v in enumerate(values):
            ids[i, : len(v)] = torch.tensor(v)
            mask[i, : len(v)] = True
        return ids, mask

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> ConditionOutput:
        ids, mask = inputs
        return ConditionOutput(Route.TOKENS, self.emb(ids) * mask[..., None], mask)

    def null(self, batch_size: int) -> ConditionOutput:
        tok = self.null_token
        value = torch.zeros(batch_size, self.config.max_len, self.config.dim, device=tok.device, dtype=tok.dtype)
        value[:, 0] = tok
        mask = torch.zeros(batch_size, self.config.max_len, dtype=torch.bool, device=tok.device)
        mask[:, 0] = True
        return ConditionOutput(Route.TOKENS, value, mask)


class MapConfig(ConditionerConfig):
    type: Literal["map"] = "map"
    key: str = "map"
    channels: int = 2


class MapCond(Conditioner):
    """An (h, w) float map at the current latent size (``latent_hw``) → channels via a 1x1 conv."""

    route = Route.CHANNELS

    def __init__(self, config: MapConfig, context: Any):
        super().__init__(config, context)
        self.output_dim = config.channels
        self.conv = nn.Conv2d(1, config.channels, 1)

    def validate_one(self, value: Any, index: int) -> torch.Tensor:
        h, w = self.latent_hw
        t = torch.as_tensor(value, dtype=torch.float32) if not isinstance(value, str) else None
        if t is None or tuple(t.shape) != (h, w):
            raise ConditionInputError(self.key, f"expected a {h}x{w} map", f"{h}x{w} numbers", index)
        return t

    def collate(self, values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        return torch.stack(values).to(device)[:, None]

    def forward(self, x: torch.Tensor) -> ConditionOutput:
        return ConditionOutput(Route.CHANNELS, self.conv(x))

    def null(self, batch_size: int) -> ConditionOutput:
        w = self.conv.weight
        return ConditionOutput(Route.CHANNELS, torch.zeros(batch_size, self.config.channels, *self.latent_hw,
                                                           device=w.device, dtype=w.dtype))


class LevelConfig(ConditionerConfig):
    type: Literal["level"] = "level"
    key: str = "level"
    dim: int = 6


class Level(Conditioner):
    """A float → vector (linear), learned null."""

    route = Route.VECTOR

    def __init__(self, config: LevelConfig, context: Any):
        super().__init__(config, context)
        self.output_dim = config.dim
        self.lin = nn.Linear(1, config.dim)
        self.null_vec = nn.Parameter(torch.randn(config.dim))

    def validate_one(self, value: Any, index: int) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConditionInputError(self.key, f"got {value!r}", "a number", index)
        return float(value)

    def collate(self, values: list[float], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    def forward(self, x: torch.Tensor) -> ConditionOutput:
        return ConditionOutput(Route.VECTOR, self.lin(x))

    def null(self, batch_size: int) -> ConditionOutput:
        return ConditionOutput(Route.VECTOR, self.null_vec.expand(batch_size, -1))


WORDS = ConditionerSpec("words", WordsConfig, Words, Route.TOKENS, "word ids -> tokens", ([1, 2], [3], [4, 5, 6, 7]))
MAP = ConditionerSpec(
    "map", MapConfig, MapCond, Route.CHANNELS, "latent-size map -> channels",
    (torch.zeros(8, 8).tolist(), torch.ones(8, 8).tolist(), torch.eye(8).tolist()),
)
LEVEL = ConditionerSpec("level", LevelConfig, Level, Route.VECTOR, "float -> vector", (0.0, 0.5, -2.0))
ALL = (WORDS, MAP, LEVEL)


class ToyPlugin:
    """A plugin object providing the three toy conditioners (registered by tests, not installed)."""

    def __init__(self, specs=ALL):
        self.specs = list(specs)

    @hookimpl
    def ldmkit_conditioners(self):
        return self.specs


def make_stack(config=None, **overrides):
    """A stack with one conditioner per route; overrides map name -> config kwargs."""
    from ldmkit import ConditionerContext, ConditioningStack

    ctx = ConditionerContext(image_size=32, latent_size=8, latent_channels=4)
    conds = [
        Words(WordsConfig(**overrides.get("words", {})), ctx),
        MapCond(MapConfig(**overrides.get("map", {})), ctx),
        Level(LevelConfig(**overrides.get("level", {})), ctx),
    ]
    return ConditioningStack(conds, config)


def batch(n=3):
    words = [[1, 2], [3], [4, 5, 6, 7], [9]][:n] if n <= 4 else [[i % 10] for i in range(n)]
    maps = [torch.full((8, 8), float(i)).tolist() for i in range(n)]
    return {"words": words, "map": maps, "level": [float(i) for i in range(n)]}
