"""The denoiser: a UNet with timestep embedding and cross-attention (LDM paper §3.3, App. F).

It consumes the conditioning stack's three routes, and is sized from what the stack reports
(:class:`~ldmkit.conditioning.UNetWiring`), never by hand:

- ``channels`` (B, C, h, w) are concatenated to ``z_t`` at the input (``in_channels = latent + C``);
- ``context`` (B, M, D) with its key-padding mask feeds every SpatialTransformer's cross-attention;
- ``vector`` (B, D) is projected and added to the timestep embedding.

Layout (as CompVis' ``openaimodel.UNetModel``): an input conv; per level ``num_res_blocks`` ResBlocks
(each followed by a SpatialTransformer at ``attention_levels``) and a stride-2 downsample except at the
last level; a middle ResBlock–Transformer–ResBlock; the mirrored decoder with skip connections and
``num_res_blocks + 1`` blocks per level; GroupNorm, SiLU and a zero-initialized output conv.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.conditioning import UNetWiring
from ldmkit.config import UNetConfig
from ldmkit.models.attention import SpatialTransformer, group_norm
from ldmkit.models.compiled import CompiledForward, compiled, compiled_state
from ldmkit.models.prepack import Conv2d, Packable, channels_last, prepacked

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``(B,) -> (B, dim)`` (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, plus the embedding (scale-free add), GroupNorm–SiLU–dropout–conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch), nn.SiLU(), Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(group_norm(out_ch), nn.SiLU(), nn.Dropout(dropout), Conv2d(out_ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if in_ch == out_ch else Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_out: torch.Tensor | None = None) -> torch.Tensor:
        """``emb_out``, when given, is ``emb_layers(emb)`` already computed (the UNet batches them when prepacked)."""
        h = self.in_layers(x) + (self.emb_layers(emb) if emb_out is None else emb_out)[:, :, None, None]
        norm, act, drop, conv = self.out_layers
        return conv(drop(act(norm(h))), add=self.skip(x))  # skip(x) + out_layers(h), the add fused when prepacked


class Block(nn.Module):
    """A ResBlock optionally followed by a SpatialTransformer."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb, context, mask, emb_out=None):
        x = self.res(x, emb, emb_out)
        return self.attn(x, context, mask) if self.attn is not None else x


class UNet(Packable, nn.Module):
    """A conditional UNet for ``z_t``; see the module docstring. Returns the raw prediction (ε, v or x0)."""

    def __init__(self, config: UNetConfig, latent_channels: int, wiring: UNetWiring | None = None):
        super().__init__()
        wiring = wiring or UNetWiring(None, 0, 0, None)
        self.config = config
        self.wiring = wiring
        self.latent_channels = latent_channels
        self.in_channels = latent_channels + wiring.extra_in_channels
        mc, mult = config.model_channels, config.channel_mult
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.vector_embed = nn.Linear(wiring.vector_dim, emb_dim) if wiring.vector_dim else None
        ctx = wiring.context_dim

        def attn(ch: int, level: int) -> SpatialTransformer | None:
            if level not in config.attention_levels:
                return None
            return SpatialTransformer(ch, config.num_heads, ctx, config.transformer_depth, config.dropout,
                                      config.position_embedding)

        self.conv_in = Conv2d(self.in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [mc]
        ch = mc
        for level, m in enumerate(mult):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(Block(ResBlock(ch, mc * m, emb_dim, config.dropout), attn(mc * m, level)))
                ch = mc * m
                skips.append(ch)
            self.down.append(blocks)
            if level < len(mult) - 1:
                self.downsample.append(Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        deepest = len(mult) - 1
        self.mid = nn.ModuleList([
            Block(ResBlock(ch, ch, emb_dim, config.dropout), SpatialTransformer(ch, config.num_heads, ctx, config.transformer_depth, config.dropout,
                                      config.position_embedding)),
            Block(ResBlock(ch, ch, emb_dim, config.dropout), None),
        ])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(mult))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(Block(ResBlock(ch + skips.pop(), mc * mult[level], emb_dim, config.dropout), attn(mc * mult[level], level)))
                ch = mc * mult[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Conv2d(ch, ch, 3, padding=1))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), Conv2d(ch, latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self._deepest = deepest

    def prepacked(self):
        """A context in which the UNet, called without autograd on a CPU, runs channels-last on weights
        reordered once for oneDNN, with fused residual adds and projections (:mod:`ldmkit.models.prepack`):
        the same function up to float rounding. ``model.sample(..., prepack=True)`` uses it."""
        return prepacked(self)

    _compiling = False  # True inside compiled()

    def compiled(self) -> contextlib.AbstractContextManager[CompiledForward]:
        """A context in which the UNet, called without autograd, runs its forward through ``torch.compile``
        (inductor, weights frozen; :mod:`ldmkit.models.compiled`): the same function up to float rounding,
        compiled at the first call. ``model.sample(..., compile=True)`` uses it."""
        return compiled(self, UNet._forward)

    def _emb_projections(self, emb: torch.Tensor) -> list[torch.Tensor]:
        """Every ResBlock's ``emb_layers(emb)``, in call order, from one matrix product (all take SiLU(emb))."""
        linears = [b.res.emb_layers[1] for blocks in (*self.down, self.mid, *self.up) for b in blocks]
        tensors = tuple(t for lin in linears for t in (lin.weight, lin.bias))
        weight, bias = self._pack("emb", tensors, lambda: (torch.cat([lin.weight for lin in linears]),
                                                           torch.cat([lin.bias for lin in linears])))
        return list(F.linear(F.silu(emb), weight, bias).split([lin.out_features for lin in linears], dim=1))

    @property
    def min_size_multiple(self) -> int:
        """Latent height and width must be multiples of this (one halving per level)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        channels: torch.Tensor | None = None,
        vector: torch.Tensor | None = None,
    ) -> torch.Tensor:
        args = (x, t, context, context_mask, channels, vector)
        state = compiled_state(self) if self._compiling and not torch.is_grad_enabled() else None
        return state(*args) if state is not None else self._forward(*args)

    def _forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        """The forward pass, arguments as :meth:`forward`'s (which runs it, compiled inside :meth:`compiled`)."""
        x, t, context, context_mask, channels, vector = args
        assert x is not None and t is not None
        if x.shape[-1] % self.min_size_multiple or x.shape[-2] % self.min_size_multiple:
            raise ValueError(
                f"latent size {tuple(x.shape[-2:])} must be a multiple of {self.min_size_multiple} "
                f"for channel_mult {self.config.channel_mult}"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        if self.vector_embed is not None:
            if vector is None:
                raise ValueError("this UNet was built with a vector route but got vector=None")
            emb = emb + self.vector_embed(vector)
        if self.wiring.extra_in_channels:
            if channels is None:
                raise ValueError("this UNet was built with a channels route but got channels=None")
            if channels.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"channels route is {tuple(channels.shape[-2:])} but the latent is {tuple(x.shape[-2:])}")
            x = torch.cat([x, channels.to(x.dtype)], dim=1)
        emb_outs = iter(())
        if self.packing():  # channels-last throughout (oneDNN's order); every ResBlock's emb projection at once
            x = channels_last(x)
            emb_outs = iter(self._emb_projections(emb))
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb, context, context_mask, next(emb_outs, None))
                hs.append(h)
            if level < len(self.down) - 1:
                h = self.downsample[level](h)
                hs.append(h)
        for block in self.mid:
            h = block(h, emb, context, context_mask, next(emb_outs, None))
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb, context, context_mask, next(emb_outs, None))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h).to(x.dtype).contiguous()  # float32 in, float32 out, also under autocast (guidance combines in fp32)
