"""Attention blocks of the UNet: the SpatialTransformer (self-attention, cross-attention, GEGLU).

As in the LDM paper (§3.3, App. F): a feature map is flattened to tokens, goes through transformer
blocks — self-attention, cross-attention to the conditioning context, a GEGLU feed-forward (Shazeer
2020), each pre-normalized and residual — and is reshaped back. Every attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where the device has them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldmkit.models.prepack import GroupNorm, Linear, Packable, compute_dtype

__all__ = ["Attention", "GEGLU", "TransformerBlock", "SpatialTransformer", "group_norm", "position_code"]


def group_norm(channels: int, max_groups: int = 32) -> GroupNorm:
    """GroupNorm with the most groups (≤ ``max_groups``) that divide ``channels`` into groups of ≥ 2.

    One channel per group would normalize away any per-channel shift — including the timestep
    embedding a ResBlock adds just before its second norm — so groups hold at least two channels.
    """
    groups = max((g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= 2), default=1)
    return GroupNorm(groups, channels, eps=1e-6)


def position_code(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """A fixed 2-D sine-cosine code of the token grid, ``(h * w, dim)`` in ``h w`` (row-major) order.

    Coordinates are cell centres normalized to 0..1, so a grid sampled at another resolution gets the same
    code at the same place in the image. Half the channels code x, half y; each half is sines and cosines
    at ``dim // 4`` frequencies geometrically spaced from 1/4 cycle per image (monotone across the image:
    "left of" is a comparison) to 8 cycles (cell-level detail up to 16 x 16 grids). Channels beyond
    ``4 * (dim // 4)`` are zero.
    """
    quarter = dim // 4
    if quarter == 0:
        return torch.zeros(h * w, dim, device=device)
    freqs = torch.logspace(math.log10(0.25), math.log10(8.0), quarter, device=device) * (2 * math.pi)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ax, ay = gx.reshape(-1, 1) * freqs, gy.reshape(-1, 1) * freqs
    code = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    return F.pad(code, (0, dim - code.shape[1]))


class Attention(Packable, nn.Module):
    """Multi-head attention; ``context=None`` makes it self-attention.

    ``mask`` is a ``(B, M)`` key-padding mask, True where a key is real. A row with no real key
    attends to every key (their values are the conditioner's padding), which avoids NaNs.

    Prepacked (:func:`ldmkit.models.prepack.prepacked`, sampling only): self-attention projects q, k and v
    in one matrix product, and cross-attention computes the context's k and v in one product and keeps them
    while the same context tensor comes back unchanged (every step of one sampling run), instead of at every
    call. The cache goes by the tensor's identity (and in-place version, where it has one): an inference
    tensor changed in place between calls would not be noticed — the sampler never does that.
    With a single context token (a class label) the softmax over one key is exactly 1, so every query's
    output is that token's value: the block's output ``to_out(v)`` is kept too and the queries are skipped.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output, plus ``add`` when given (the residual, fused into the output projection)."""
        if self.single_key(context):
            y = self._single_key_output(context)  # type: ignore[arg-type]
            return y.expand(x.shape[0], x.shape[1], -1) if add is None else add + y
        if self.packing():
            q, k, v = self._packed_qkv(x, context)
        else:
            source = x if context is None else context
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
            k = rearrange(self.to_k(source), "b m (h d) -> b h m d", h=self.heads)
            v = rearrange(self.to_v(source), "b m (h d) -> b h m d", h=self.heads)
        attn_mask = None
        if mask is not None:
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            attn_mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"), add=add)

    def _packed_qkv(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q, k, v as ``(B, heads, tokens, d)`` from fused projections (see the class docstring)."""
        heads = self.heads
        if context is None:
            w = self._pack("qkv", (self.to_q.weight, self.to_k.weight, self.to_v.weight),
                           lambda: torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            return F.linear(x, w).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        return (q, *self._context_kv(context))

    def single_key(self, context: torch.Tensor | None) -> bool:
        """Whether, prepacked, this call takes the single-context-token path (its queries are not used)."""
        return context is not None and context.shape[1] == 1 and self.packing()

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context's k and v ``(B, heads, M, d)`` in one product, kept while the context tensor, its version
        and the weights are unchanged (the cached entry holds the context, so its storage cannot be reused)."""
        def build():
            w = torch.cat([self.to_k.weight, self.to_v.weight])
            return context, *F.linear(context, w).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)

        dtype = compute_dtype(context.device.type, context.dtype)
        _, k, v = self._pack(("kv", dtype), (context, self.to_k.weight, self.to_v.weight), build)
        return k, v

    def _single_key_output(self, context: torch.Tensor) -> torch.Tensor:
        """``to_out(v)`` of the one context token, ``(B, 1, dim)``, kept like the context's k and v."""
        def build():
            return context, self.to_out(rearrange(self._context_kv(context)[1], "b h m d -> b m (h d)"))

        dtype = compute_dtype(context.device.type, context.dtype)
        tensors = (context, self.to_k.weight, self.to_v.weight, self.to_out.weight, self.to_out.bias)
        return self._pack(("out", dtype), tensors, build)[1]


class GEGLU(nn.Module):
    """Gated GELU feed-forward: ``W2 (GELU(x W_g) * (x W_v))`` with a 4x inner width."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.proj = Linear(dim, inner * 2)
        self.out = nn.Sequential(nn.Dropout(dropout), Linear(inner, dim))

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """The feed-forward output, plus ``add`` when given (the residual, fused into the last product)."""
        drop, out = self.out
        dtype = self.proj.packed_dtype(x)
        if dtype is not None:  # prepacked: value and gate as two products, GELU fused into the gate's
            x, inner = x.to(dtype), self.proj.out_features // 2
            value = self.proj.packed(x, slice(0, inner))
            return out(drop(value * self.proj.packed(x, slice(inner, None), gelu=True)), add=add)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return out(drop(value * F.gelu(gate)), add=add)


class TransformerBlock(nn.Module):
    """Self-attention, then cross-attention to the context (if the model has one), then GEGLU."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.cross = context_dim is not None
        if self.cross:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), add=x)  # x + attn1(norm1(x)); the residual adds fuse when prepacked
        if self.cross:
            if context is None:
                raise ValueError("this UNet was built with a context (tokens route) but got context=None")
            queries = x if self.attn2.single_key(context) else self.norm2(x)  # one context token: queries unused
            x = self.attn2(queries, context, mask, add=x)
        return self.ff(self.norm3(x), add=x)


class SpatialTransformer(nn.Module):
    """(B, C, H, W) → tokens → ``depth`` transformer blocks → (B, C, H, W), residual, zero-initialized out.

    With ``position_embedding="sincos"`` the tokens get :func:`position_code` added after ``proj_in``.
    """

    def __init__(self, channels: int, heads: int, context_dim: int | None, depth: int = 1, dropout: float = 0.0,
                 position_embedding: str = "none"):
        super().__init__()
        if position_embedding not in ("none", "sincos"):
            raise ValueError(f"position_embedding must be 'none' or 'sincos', got {position_embedding!r}")
        self.position_embedding = position_embedding
        self._codes: dict[tuple, torch.Tensor] = {}
        self.norm = group_norm(channels)
        self.proj_in = Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, dropout) for _ in range(depth))
        self.proj_out = Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        if self.position_embedding == "sincos":
            tokens = tokens + self._code(h, w, tokens)
        for block in self.blocks:
            tokens = block(tokens, context, mask)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():  # prepacked: x's tokens are a view
            return rearrange(self.proj_out(tokens, add=rearrange(x, "b c h w -> b (h w) c")), "b (h w) c -> b c h w", h=h, w=w)
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)

    def _code(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The position code for an ``h x w`` grid, cached per grid, device and dtype (not a buffer: the
        state dict, and so every checkpoint, is the same with and without it)."""
        key = (h, w, like.device, like.dtype)
        if key not in self._codes:
            with torch.inference_mode(False):  # a normal tensor, usable by training after sampling
                self._codes[key] = position_code(h, w, like.shape[-1], like.device).to(like.dtype)
        return self._codes[key]
