"""Layout conditioning: labelled bounding boxes → cross-attention tokens (LDM paper §4.3, layout-to-image).

Each sample's input is a list of objects, each a ``{"label": ..., "bbox": [x0, y0, x1, y1]}`` dict (what
``--cond boxes='[...]'`` and JSONL manifests give) or any object with ``label`` and ``bbox`` attributes
(the data sets' ``Box``). ``label`` is a name from the configured vocabulary (``labels``; by default the
shapes world's 18 classes) or an integer id into it; ``bbox`` is normalized to 0..1, x to the right,
y down, with ``x0 < x1`` and ``y0 < y1``.

Two tokenizations (config ``tokenization``):

- ``objects`` (default; GLIGEN's grounding tokens, Li et al. 2023): one token per object,
  ``MLP([box, sin/cos Fourier features of the 4 coordinates, learned label embedding])``. Tokens carry
  no slot position, so the output is permutation-equivariant in the objects;
- ``grid`` (the LDM paper's tokenization): each box's top-left and bottom-right corners are quantized
  to the nearest point of a ``(grid_size + 1) x (grid_size + 1)`` lattice; every object becomes three
  tokens (label, corner 1, corner 2) plus a role embedding and an object-slot embedding, and a small
  transformer encoder (``grid_layers``) mixes them so that a label is bound to its corners (the paper
  uses a transformer τθ over the same tuples).

The output is padded to a fixed length (``max_objects`` tokens, ``3 * max_objects`` for ``grid``) with a
key-padding mask (True = real token); padding tokens are zeros.

**Null and empty lists.** The null (classifier-free guidance, condition dropout) is a learned token in
slot 0 with mask ``[True, False, ...]``, the rest padding. An **empty list** (no objects) is accepted and
gives exactly the null output: "no layout" means "no layout constraint", so a model composing layout
with other conditioners can leave some samples without boxes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ldmkit import Conditioner, ConditionerConfig, ConditionerSpec, ConditionInputError, ConditionOutput, Route, hookimpl

__all__ = ["SHAPES_LABELS", "LayoutConfig", "LayoutConditioner", "SPEC", "ldmkit_conditioners", "normalize_label"]

#: The shapes world's 18 class names, in class-id order (shape-major): "red circle", "green circle", ...
SHAPES_LABELS: tuple[str, ...] = tuple(
    f"{colour} {shape}"
    for shape in ("circle", "square", "triangle")
    for colour in ("red", "green", "blue", "yellow", "magenta", "cyan")
)


def normalize_label(name: str) -> str:
    """How label names are compared: lower-case, surrounding and repeated whitespace removed."""
    return " ".join(name.lower().split())


class LayoutConfig(ConditionerConfig):
    """Config of the ``layout`` conditioner."""

    type: Literal["layout"] = "layout"
    key: str = "boxes"
    labels: list[str] = Field(
        default_factory=lambda: list(SHAPES_LABELS), min_length=1,
        description="label vocabulary; an object's label is one of these names or its index",
    )
    max_objects: int = Field(default=8, ge=1, le=256, description="objects per sample at most (tokens are padded to it)")
    dim: int = Field(default=128, ge=1, description="token width")
    tokenization: Literal["objects", "grid"] = Field(
        default="objects", description="objects: one token per object; grid: label + 2 quantized corners per object"
    )
    fourier_freqs: int = Field(default=8, ge=1, le=16, description="objects: sin/cos frequencies 100^(k/fourier_freqs), k < fourier_freqs")
    hidden_dim: int = Field(default=256, ge=1, description="objects: width of the token MLP")
    grid_size: int = Field(default=8, ge=1, le=64, description="grid: cells per side (corners snap to (grid_size+1)^2 points)")
    grid_layers: int = Field(default=2, ge=0, le=12, description="grid: transformer layers mixing an object's tokens")
    grid_heads: int = Field(default=4, ge=1, description="grid: attention heads (must divide dim)")

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for name in labels:
            norm = normalize_label(name)
            if not norm:
                raise ValueError("labels must be non-empty names")
            if norm in seen:
                raise ValueError(f"labels must be unique: {seen[norm]!r} and {name!r} are the same label")
            seen[norm] = name
        return labels

    @model_validator(mode="after")
    def _heads(self) -> "LayoutConfig":
        if self.tokenization == "grid" and self.grid_layers and self.dim % self.grid_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by grid_heads ({self.grid_heads})")
        return self


class _Block(nn.Module):
    """A pre-norm transformer encoder block (self-attention with a key-padding mask, then an MLP)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class LayoutConditioner(Conditioner):
    """Labelled boxes → ``(B, M, dim)`` tokens and a ``(B, M)`` mask on the tokens route."""

    route = Route.TOKENS

    def __init__(self, config: LayoutConfig, context: Any):
        super().__init__(config, context)
        self.output_dim = config.dim
        self.max_objects = config.max_objects
        self.grid = config.tokenization == "grid"
        self.num_tokens = config.max_objects * (3 if self.grid else 1)
        self._ids = {normalize_label(name): i for i, name in enumerate(config.labels)}
        self.label_embedding = nn.Embedding(len(config.labels), config.dim)
        nn.init.normal_(self.label_embedding.weight, std=0.02)
        if self.grid:
            points = config.grid_size + 1
            self.corner_embedding = nn.Embedding(points * points, config.dim)
            self.role_embedding = nn.Parameter(torch.randn(3, config.dim) * 0.02)  # label, corner 1, corner 2
            self.slot_embedding = nn.Parameter(torch.randn(config.max_objects, config.dim) * 0.02)
            nn.init.normal_(self.corner_embedding.weight, std=0.02)
            self.blocks = nn.ModuleList(_Block(config.dim, config.grid_heads) for _ in range(config.grid_layers))
            self.norm = nn.LayerNorm(config.dim)
        else:
            # GLIGEN's frequencies: 100^(k/F) radians per unit, k < F (1 ... 56 for F = 8): the finest
            # still resolves a pixel at 32x32 instead of aliasing (pi * 2^k would reach 128 pi)
            freqs = 100.0 ** (torch.arange(config.fourier_freqs, dtype=torch.float32) / config.fourier_freqs)
            self.register_buffer("freqs", freqs, persistent=False)  # a constant of the config
            in_dim = 4 + 8 * config.fourier_freqs + config.dim
            h = config.hidden_dim
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, config.dim)
            )
        self.null_token = nn.Parameter(torch.randn(config.dim) * 0.02)

    # -- input ---------------------------------------------------------------------------------
    def _allowed(self) -> str:
        return (f"a list of at most {self.max_objects} objects, each {{\"label\": a name or an integer id, "
                f"\"bbox\": [x0, y0, x1, y1]}} (or a Box) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")

    def _labels_allowed(self) -> str:
        names = self.config.labels
        shown = ", ".join(repr(n) for n in names[:4]) + (f", ... ({len(names)} labels)" if len(names) > 4 else "")
        return f"a label name ({shown}) or an integer id in 0..{len(names) - 1}"

    def _label_id(self, label: Any, j: int, index: int) -> int:
        if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = label.item()
        if isinstance(label, str):
            i = self._ids.get(normalize_label(label))
            if i is None:
                raise ConditionInputError(self.key, f"object {j}: unknown label {label!r}", self._labels_allowed(), index)
            return i
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise ConditionInputError(
                self.key, f"object {j}: label must be a name or an integer id, got {label!r}", self._labels_allowed(), index
            )
        if not 0 <= int(label) < len(self.config.labels):
            raise ConditionInputError(self.key, f"object {j}: label id {label} is out of range", self._labels_allowed(), index)
        return int(label)

    def _bbox(self, bbox: Any, j: int, index: int) -> tuple[float, float, float, float]:
        allowed = "[x0, y0, x1, y1]: 4 numbers in 0..1 with x0 < x1 and y0 < y1 (x right, y down)"
        if hasattr(bbox, "tolist") and not isinstance(bbox, (list, tuple)):  # numpy arrays, tensors
            bbox = bbox.tolist()
        if isinstance(bbox, (str, bytes)) or not isinstance(bbox, Sequence):
            raise ConditionInputError(self.key, f"object {j}: bbox must be a list of 4 numbers, got {bbox!r}", allowed, index)
        if len(bbox) != 4:
            raise ConditionInputError(self.key, f"object {j}: bbox has {len(bbox)} coordinates, not 4", allowed, index)
        coords = []
        for name, v in zip(("x0", "y0", "x1", "y1"), bbox):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ConditionInputError(self.key, f"object {j}: bbox {name} is not a number: {v!r}", allowed, index)
            v = float(v)
            if not math.isfinite(v):
                raise ConditionInputError(self.key, f"object {j}: bbox {name} is {v}", allowed, index)
            if not 0.0 <= v <= 1.0:
                raise ConditionInputError(self.key, f"object {j}: bbox {name}={v} is outside 0..1", allowed, index)
            coords.append(v)
        x0, y0, x1, y1 = coords
        if not x0 < x1:
            raise ConditionInputError(self.key, f"object {j}: bbox needs x0 < x1, got x0={x0}, x1={x1}", allowed, index)
        if not y0 < y1:
            raise ConditionInputError(self.key, f"object {j}: bbox needs y0 < y1, got y0={y0}, y1={y1}", allowed, index)
        return x0, y0, x1, y1

    def validate_one(self, value: Any, index: int) -> tuple[list[int], list[tuple[float, float, float, float]]]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ConditionInputError(self.key, f"expected a list of objects, got {type(value).__name__} {value!r:.80}",
                                      self._allowed(), index)
        if len(value) > self.max_objects:
            raise ConditionInputError(self.key, f"{len(value)} objects, more than max_objects={self.max_objects}",
                                      self._allowed(), index)
        labels, boxes = [], []
        for j, obj in enumerate(value):
            if isinstance(obj, Mapping):
                missing = [k for k in ("label", "bbox") if k not in obj]
                extra = sorted(str(k) for k in obj if k not in ("label", "bbox"))
                if missing or extra:
                    what = (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and extra else "") + (
                        f"unknown key(s) {', '.join(extra)}" if extra else "")
                    raise ConditionInputError(self.key, f"object {j}: {what}", self._allowed(), index)
                label, bbox = obj["label"], obj["bbox"]
            elif hasattr(obj, "label") and hasattr(obj, "bbox"):
                label, bbox = obj.label, obj.bbox
            else:
                raise ConditionInputError(self.key, f"object {j}: expected a {{label, bbox}} object, got {obj!r:.80}",
                                          self._allowed(), index)
            labels.append(self._label_id(label, j, index))
            boxes.append(self._bbox(bbox, j, index))
        return labels, boxes

    def collate(self, values: list[tuple[list[int], list[tuple[float, ...]]]], device: torch.device) -> dict[str, torch.Tensor]:
        b, m = len(values), self.max_objects
        coords = torch.zeros(b, m, 4)
        labels = torch.zeros(b, m, dtype=torch.long)
        mask = torch.zeros(b, m, dtype=torch.bool)
        for i, (ids, boxes) in enumerate(values):
            n = len(ids)
            if n:
                coords[i, :n] = torch.tensor(boxes, dtype=torch.float32)
                labels[i, :n] = torch.tensor(ids, dtype=torch.long)
                mask[i, :n] = True
        return {"coords": coords.to(device), "labels": labels.to(device), "mask": mask.to(device)}

    # -- output --------------------------------------------------------------------------------
    def _object_tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        angles = coords[..., None] * self.freqs  # (B, M, 4, F)
        fourier = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        return self.mlp(torch.cat([coords, fourier, self.label_embedding(labels)], dim=-1))

    def _grid_tokens(self, coords: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        g = self.config.grid_size
        q = torch.round(coords * g).long().clamp_(0, g)  # corner -> nearest lattice point
        c1, c2 = q[..., 1] * (g + 1) + q[..., 0], q[..., 3] * (g + 1) + q[..., 2]
        x = torch.stack([self.label_embedding(labels), self.corner_embedding(c1), self.corner_embedding(c2)], dim=2)
        x = x + self.role_embedding + self.slot_embedding[:, None, :]  # (B, M, 3, d)
        x = x.flatten(1, 2)
        keys = mask.repeat_interleave(3, dim=1)
        keys = keys | ~keys.any(dim=1, keepdim=True)  # empty samples (replaced by the null later): no NaN
        for block in self.blocks:
            x = block(x, keys)
        return self.norm(x)

    def forward(self, inputs: dict[str, torch.Tensor]) -> ConditionOutput:
        coords, labels, mask = inputs["coords"], inputs["labels"], inputs["mask"]
        if self.grid:
            tokens = self._grid_tokens(coords, labels, mask)
            mask = mask.repeat_interleave(3, dim=1)
        else:
            tokens = self._object_tokens(coords, labels)
        tokens = tokens * mask[..., None].to(tokens.dtype)  # padding tokens are zeros
        empty = ~mask.any(dim=1)
        if bool(empty.any()):  # an empty list means "no layout": the null output
            null = self.null(tokens.shape[0])
            tokens = torch.where(empty[:, None, None], null.value.to(tokens.dtype), tokens)
            mask = torch.where(empty[:, None], null.mask, mask)
        return ConditionOutput(Route.TOKENS, tokens, mask)

    def null(self, batch_size: int) -> ConditionOutput:
        token = self.null_token.view(1, 1, -1).expand(batch_size, 1, -1)
        pad = token.new_zeros(batch_size, self.num_tokens - 1, self.output_dim)
        mask = torch.zeros(batch_size, self.num_tokens, dtype=torch.bool, device=token.device)
        mask[:, 0] = True
        return ConditionOutput(Route.TOKENS, torch.cat([token, pad], dim=1), mask)


SPEC = ConditionerSpec(
    name="layout",
    config_cls=LayoutConfig,
    build=LayoutConditioner,
    route=Route.TOKENS,
    description="labelled boxes (layout) -> one token per object (or label + 2 grid corners), for cross-attention",
    example_inputs=(
        [{"label": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4]}],
        [{"label": "blue square", "bbox": [0.5, 0.2, 0.9, 0.6]}, {"label": 14, "bbox": [0.1, 0.6, 0.3, 0.9]}],
        [
            {"label": "yellow triangle", "bbox": [0.05, 0.05, 0.3, 0.3]},
            {"label": "cyan circle", "bbox": [0.6, 0.1, 0.95, 0.45]},
            {"label": "magenta square", "bbox": [0.35, 0.6, 0.65, 0.9]},
        ],
    ),
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
