"""The first stage: a convolutional autoencoder that maps images to a compact latent space.

One file, nanoGPT style: a validated config (:class:`AutoencoderConfig`), the building blocks, the
encoder and decoder, the two regularizers and the :class:`Autoencoder` that ties them together.

Architecture (Rombach et al. 2022, App. G; the CompVis ``Encoder``/``Decoder``):

- ``Encoder``: ``conv_in`` -> per level ``num_res_blocks`` ResNet blocks (+ self-attention at the
  ``attn_resolutions``) and a stride-2 downsample except at the last level -> mid (ResNet block,
  self-attention, ResNet block) -> GroupNorm, swish, ``conv_out``. The downsampling factor is
  ``f = 2 ** (len(ch_mult) - 1)``.
- ``Decoder``: the mirror image, with ``num_res_blocks + 1`` blocks per level and nearest-neighbour
  upsampling followed by a 3x3 convolution.
- Regularizers: ``kind="kl"`` -- a diagonal Gaussian posterior (log-variance clamped to [-30, 20]),
  ``kind="vq"`` -- a codebook with commitment loss (beta = 0.25), straight-through gradients, usage
  tracking and re-initialization of dead codes from encoder outputs.

Module names follow the CompVis state-dict layout (``encoder.down.0.block.0.norm1``, ``quant_conv``,
``post_quant_conv``, ``quantize.embedding``), so converting a CompVis first-stage checkpoint is a
matter of copying tensors.

Latents: :meth:`Autoencoder.encode` returns ``scale_factor * z`` where ``z`` is the posterior mode (or
a sample) for KL and the **pre-quantization** latent for VQ (paper App. G: "we extract z before the
quantization layer and absorb the quantization operation into the decoder"); :meth:`Autoencoder.decode`
divides by the scale factor and, for VQ, quantizes first. The scale factor is a buffer, so it travels
with the weights; ``scale_factor="std"`` means "set it to 1/std of training latents after training"
(:meth:`Autoencoder.set_scale_from_std`, the paper's ``scale_by_std``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

__all__ = [
    "ALLOWED_DOWNSAMPLE_FACTORS",
    "AutoencoderConfig",
    "Autoencoder",
    "AutoencoderOutput",
    "DiagonalGaussian",
    "VectorQuantizer",
    "save_autoencoder",
    "load_autoencoder",
]

#: The downsampling factors the paper studies (LDM-1 ... LDM-32).
ALLOWED_DOWNSAMPLE_FACTORS = (1, 2, 4, 8, 16, 32)


# ---------------------------------------------------------------------------------------------------
# Config


class AutoencoderConfig(BaseModel):
    """Hyper-parameters of an :class:`Autoencoder`. Unknown fields are an error.

    Defaults give a small KL-f4 model (~1 M parameters) for 32x32 images with 8x8x3 latents.
    The CompVis kl-f4 model is ``ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3,
    embed_dim=3, resolution=256``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kl", "vq"] = Field("kl", description="regularizer: 'kl' (Gaussian) or 'vq' (codebook)")
    resolution: int = Field(32, gt=0, description="training image size (H = W); attn_resolutions refer to it")
    in_channels: int = Field(3, gt=0, description="image channels (input and output)")
    ch: int = Field(32, gt=0, description="base channel count")
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], description="channel multiplier per level")
    num_res_blocks: int = Field(1, ge=1, description="ResNet blocks per encoder level (decoder: +1)")
    attn_resolutions: list[int] = Field(default_factory=list, description="feature sizes with self-attention")
    mid_attention: bool = Field(True, description="self-attention block in the middle of encoder and decoder")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout inside the ResNet blocks")
    norm: Literal["group", "none"] = Field(
        "group",
        description="normalization in the blocks: GroupNorm (reference) or none. GroupNorm normalizes every "
        "image by its own statistics, so small models trained briefly are slow to learn absolute colour; "
        "'none' learns colour much faster (used by the photos recipe)",
    )
    norm_groups: int = Field(8, gt=0, description="GroupNorm groups; must divide every channel count (reference: 32)")
    z_channels: int = Field(3, gt=0, description="channels at the encoder output / decoder input")
    embed_dim: int = Field(3, gt=0, description="latent channels C (after quant_conv)")
    n_embed: int | None = Field(None, gt=1, description="codebook size (VQ only)")
    beta: float = Field(0.25, ge=0.0, description="commitment weight (VQ only)")
    dead_code_threshold: float = Field(
        0.03, ge=0.0, lt=1.0,
        description="VQ: a code whose EMA usage is below this fraction of the uniform share 1/n_embed "
        "is re-initialized from encoder outputs; 0 disables",
    )
    usage_decay: float = Field(0.99, gt=0.0, lt=1.0, description="VQ: EMA decay of the code-usage statistics")
    scale_factor: float | Literal["std"] = Field(
        "std", description="latent scale: a fixed positive number, or 'std' = 1/std of training latents"
    )

    @property
    def downsample_factor(self) -> int:
        """f = 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {self.ch_mult}")
        f = self.downsample_factor
        if f not in ALLOWED_DOWNSAMPLE_FACTORS:
            raise ValueError(
                f"ch_mult={self.ch_mult} gives a downsampling factor f=2^{len(self.ch_mult) - 1}={f}; "
                f"allowed f: {list(ALLOWED_DOWNSAMPLE_FACTORS)} (ch_mult of length 1 to 6)"
            )
        if self.resolution % f:
            raise ValueError(f"resolution={self.resolution} is not divisible by the downsampling factor f={f}")
        level_res = [self.resolution // 2**i for i in range(len(self.ch_mult))]
        bad = [r for r in self.attn_resolutions if r not in level_res]
        if bad:
            raise ValueError(
                f"attn_resolutions {bad} are not feature sizes of this model; allowed: {level_res} "
                f"(resolution={self.resolution}, ch_mult={self.ch_mult})"
            )
        channels = {self.ch * m for m in self.ch_mult}
        bad_ch = sorted(c for c in channels if c % self.norm_groups) if self.norm == "group" else []
        if bad_ch:
            raise ValueError(
                f"norm_groups={self.norm_groups} must divide every channel count ch*ch_mult = "
                f"{sorted(channels)}; {bad_ch} are not divisible (change ch or norm_groups)"
            )
        if self.kind == "vq" and self.n_embed is None:
            raise ValueError("kind='vq' needs n_embed (the codebook size), e.g. n_embed: 256")
        if self.kind == "kl" and self.n_embed is not None:
            raise ValueError("n_embed is only used by kind='vq'; remove it for kind='kl'")
        if isinstance(self.scale_factor, float) and not (self.scale_factor > 0 and math.isfinite(self.scale_factor)):
            raise ValueError(f"scale_factor must be a positive finite number or 'std', got {self.scale_factor}")
        return self


# ---------------------------------------------------------------------------------------------------
# Building blocks


def _norm(channels: int, groups: int | None) -> nn.Module:
    """GroupNorm(groups) as in the reference, or no normalization when ``groups`` is None."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True) if groups else nn.Identity()


def _groups(cfg: AutoencoderConfig) -> int | None:
    return cfg.norm_groups if cfg.norm == "group" else None


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a (1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, dropout: float, groups: int | None):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions for q, k, v and the output."""

    def __init__(self, channels: int, groups: int | None):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-0.5
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding right and bottom by one (the CompVis convention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResNet blocks (each optionally followed by attention) and a resampler."""

    def __init__(self, block: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self._resample_name is not None:
            x = getattr(self, self._resample_name)(x)
        return x


class _Mid(nn.Module):
    def __init__(self, channels: int, cfg: AutoencoderConfig):
        super().__init__()
        g = _groups(cfg)
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout, g)
        self.attn_1 = AttnBlock(channels, g) if cfg.mid_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout, g)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, out_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        g = _groups(cfg)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in, res = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, g))
                c_in = c_out
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, attns, None if last else Downsample(c_in), "downsample"))
            res = res if last else res // 2
        self.mid = _Mid(c_in, cfg)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent features (B, z_channels, h, w) -> image (B, in_channels, h*f, w*f).

    ``up`` is stored in resolution order (``up[0]`` is full resolution) but run from the last level.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = _groups(cfg)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg)
        levels: list[_Level] = []
        res = cfg.resolution // cfg.downsample_factor
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out, cfg.dropout, g))
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, g))
                c = c_out
            levels.insert(0, _Level(blocks, attns, Upsample(c) if i > 0 else None, "upsample"))
            res = res * 2 if i > 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------
# Regularizers


class DiagonalGaussian:
    """A diagonal Gaussian over latents, from ``moments`` = concat(mean, logvar) on dim 1.

    The log-variance is clamped to [-30, 20] for numerical safety (as in the reference code).
    """

    LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

    def __init__(self, moments: Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, self.LOGVAR_MIN, self.LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterized sample ``mean + std * eps`` (gradients flow to mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The posterior mode (= mean)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per example, summed over C, H, W: shape (B,)."""
        return 0.5 * torch.sum(self.mean**2 + torch.exp(self.logvar) - 1.0 - self.logvar, dim=(1, 2, 3))


@dataclass
class QuantizerOutput:
    """What :class:`VectorQuantizer` returns: quantized latents (straight-through), loss and stats."""

    z_q: Tensor
    loss: Tensor
    indices: Tensor  # (B, h, w) code ids
    perplexity: Tensor  # exp(entropy of this batch's code histogram)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (van den Oord et al. 2017) with the usual training aids.

    - loss = ||sg[z_q] - z||^2 * beta + ||z_q - sg[z]||^2 (commitment weighted by ``beta``; this is the
      paper's form, not taming's "legacy" form that puts beta on the codebook term);
    - straight-through estimator: the decoder's gradient is copied to the encoder output;
    - ``usage``: an EMA (decay ``usage_decay``) of the fraction of latent vectors assigned to each code,
      updated in training mode; it starts at 0;
    - :meth:`restart_dead_codes`: codes whose usage is below ``dead_code_threshold / n_embed`` are
      re-initialized to randomly chosen encoder outputs (call it after the optimizer step). Since usage
      starts at 0, the first call initializes every unused code from data.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float, usage_decay: float, dead_code_threshold: float):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.usage_decay, self.dead_code_threshold = usage_decay, dead_code_threshold
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        # starts at 0 ("no evidence of use"), so the first restart initializes the codebook from data
        self.register_buffer("usage", torch.zeros(n_embed))
        self._last_inputs: Tensor | None = None  # flattened encoder outputs of the last training batch

    def codes(self, z: Tensor) -> Tensor:
        """Index of the nearest code (squared L2) for each vector of ``z`` (B, C, h, w) -> (B, h, w)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None, :]
        return d.argmin(1).reshape(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes for ``indices`` (B, h, w) as a (B, C, h, w) tensor."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> QuantizerOutput:
        indices = self.codes(z)
        z_q = self.lookup(indices)
        loss = self.beta * F.mse_loss(z, z_q.detach()) + F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()  # straight-through
        hist = torch.bincount(indices.flatten(), minlength=self.n_embed).to(z.dtype) / indices.numel()
        perplexity = torch.exp(-torch.sum(hist * torch.log(hist + 1e-10)))
        if self.training:
            with torch.no_grad():
                self.usage.mul_(self.usage_decay).add_(hist, alpha=1.0 - self.usage_decay)
            self._last_inputs = z.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices, perplexity=perplexity)

    @torch.no_grad()
    def restart_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Re-initialize dead codes from the last training batch's encoder outputs; returns how many.

        Uses the global torch RNG (or ``generator``), so training stays reproducible when the RNG
        state is checkpointed. A restarted code's usage is reset to the uniform share 1/n_embed.
        """
        if self.dead_code_threshold <= 0 or self._last_inputs is None:
            return 0
        dead = torch.nonzero(self.usage < self.dead_code_threshold / self.n_embed).flatten()
        if dead.numel() == 0:
            return 0
        pool = self._last_inputs
        if dead.numel() <= pool.shape[0]:  # distinct encoder outputs when there are enough
            pick = torch.randperm(pool.shape[0], generator=generator, device=pool.device)[: dead.numel()]
        else:
            pick = torch.randint(0, pool.shape[0], (dead.numel(),), generator=generator, device=pool.device)
        self.embedding.weight[dead] = pool[pick].to(self.embedding.weight.dtype)
        self.usage[dead] = 1.0 / self.n_embed
        return int(dead.numel())

    def usage_fraction(self) -> float:
        """Fraction of codes whose EMA usage is at least the dead-code threshold (live codes)."""
        thr = max(self.dead_code_threshold, 1e-3) / self.n_embed
        return float((self.usage >= thr).float().mean())


# ---------------------------------------------------------------------------------------------------
# The autoencoder


@dataclass
class AutoencoderOutput:
    """What :meth:`Autoencoder.forward` returns during training."""

    reconstruction: Tensor
    reg_loss: Tensor  # KL: mean over the batch of the per-image KL sum; VQ: codebook + commitment loss
    posterior: DiagonalGaussian | None = None
    quantized: QuantizerOutput | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Autoencoder(nn.Module):
    """The LDM first stage: ``encode`` images in [-1, 1] to (scaled) latents and ``decode`` them back.

    >>> ae = Autoencoder(AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], norm_groups=8))
    >>> z = ae.encode(torch.zeros(2, 3, 32, 32))
    >>> tuple(z.shape), tuple(ae.decode(z).shape)
    ((2, 3, 8, 8), (2, 3, 32, 32))
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = config
        double = 2 if c.kind == "kl" else 1
        self.encoder = Encoder(c, double * c.z_channels)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(double * c.z_channels, double * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.quantize: VectorQuantizer | None = None
        if c.kind == "vq":
            assert c.n_embed is not None
            self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, c.beta, c.usage_decay, c.dead_code_threshold)
        init = 1.0 if c.scale_factor == "std" else float(c.scale_factor)
        self.register_buffer("scale_factor", torch.tensor(init, dtype=torch.float32))
        self._frozen = False

    # -- shapes ---------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        """f: the latent is f times smaller than the image along H and W."""
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        """C of the latent (``embed_dim``)."""
        return self.config.embed_dim

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H/f, W/f) for an image of ``height x width``; ValueError when not divisible by f."""
        self._check_size(height, width)
        f = self.downsample_factor
        return (self.latent_channels, height // f, width // f)

    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} (HxW) is not divisible by the autoencoder's downsampling "
                f"factor f={f}; use a height and width that are multiples of {f}"
            )

    def _check_image(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W) in [-1, 1], got {tuple(x.shape)}"
            )
        self._check_size(x.shape[2], x.shape[3])

    # -- encode / decode ------------------------------------------------------------------------

    def encode_features(self, x: Tensor) -> Tensor:
        """Unscaled encoder output after ``quant_conv``: KL moments (2C channels) or VQ pre-quantization z."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """The KL posterior q(z|x) (unscaled). ValueError for a VQ model."""
        if self.config.kind != "kl":
            raise ValueError("posterior() is only defined for kind='kl'; this autoencoder has kind='vq'")
        return DiagonalGaussian(self.encode_features(x))

    def encode(
        self,
        x: Tensor,
        *,
        sample: bool = False,
        quantize: bool = False,
        scaled: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f), multiplied by the scale factor.

        - KL: the posterior mode, or a sample with ``sample=True`` (the reference LDM trainer samples);
        - VQ: the pre-quantization latent (what the diffusion model works on), or the quantized one
          with ``quantize=True``;
        - ``scaled=False`` skips the scale factor (used to estimate it).
        """
        h = self.encode_features(x)
        if self.config.kind == "kl":
            post = DiagonalGaussian(h)
            z = post.sample(generator) if sample else post.mode()
        else:
            assert self.quantize is not None
            z = self.quantize.lookup(self.quantize.codes(h)) if quantize else h
        return z * self.scale_factor if scaled else z

    def decode(self, z: Tensor, *, scaled: bool = True) -> Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped).

        Divides by the scale factor first (unless ``scaled=False``); a VQ model quantizes next.
        """
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        if scaled:
            z = z / self.scale_factor
        if self.quantize is not None:
            z = self.quantize.lookup(self.quantize.codes(z))
        return self.decoder(self.post_quant_conv(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) with the posterior mode (KL) or nearest codes (VQ); no scale round trip."""
        return self.decode(self.encode(x, scaled=False), scaled=False)

    def forward(self, x: Tensor, *, sample_posterior: bool = True) -> AutoencoderOutput:
        """Training pass: reconstruction plus the regularizer's loss and statistics."""
        h = self.encode_features(x)
        if self.config.kind == "kl":
            post = DiagonalGaussian(h)
            z = post.sample() if sample_posterior else post.mode()
            rec = self.decoder(self.post_quant_conv(z))
            kl = post.kl().mean()
            return AutoencoderOutput(rec, kl, posterior=post, stats={"kl": float(kl.detach())})
        assert self.quantize is not None
        q = self.quantize(h)
        rec = self.decoder(self.post_quant_conv(q.z_q))
        stats = {"codebook": float(q.loss.detach()), "perplexity": float(q.perplexity)}
        if self.training:
            stats["usage"] = self.quantize.usage_fraction()
        return AutoencoderOutput(rec, q.loss, quantized=q, stats=stats)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight

    # -- scale factor and freezing --------------------------------------------------------------

    @torch.no_grad()
    def set_scale_from_std(self, latents: Tensor) -> float:
        """Set the scale factor to 1/std of *unscaled* ``latents`` (all elements); returns it."""
        std = float(latents.detach().float().flatten().std())
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"cannot set the scale factor from latents with std={std}")
        self.scale_factor.fill_(1.0 / std)
        return 1.0 / std

    def freeze(self) -> Autoencoder:
        """Eval mode, no gradients, and stay in eval mode even if a parent calls ``.train()``."""
        self._frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Autoencoder:
        return super().train(False if self._frozen else mode)

    def num_parameters(self) -> int:
        """Number of parameters (buffers excluded)."""
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------------
# Files

#: ``ldmkit.kind`` of a stand-alone autoencoder file (:func:`save_autoencoder`).
CHECKPOINT_KIND = "autoencoder"


def save_autoencoder(
    model: Autoencoder,
    path: str | os.PathLike[str],
    *,
    dtype: Literal["float32", "float16"] = "float32",
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the autoencoder's weights and config to one safetensors file (atomically).

    Parameters are stored as ``dtype``; buffers (the scale factor, VQ usage) stay float32. Metadata:
    ``ldmkit.kind="autoencoder"``, ``ldmkit.version``, ``ldmkit.config`` (the :class:`AutoencoderConfig`)
    and ``ldmkit.scale_factor`` (for people reading the header).
    """
    from ldmkit.train.checkpoint import make_metadata, module_tensors, save_checkpoint

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    buffers = {name for name, _ in model.named_buffers()}
    tensors = module_tensors(model)
    if dtype == "float16":
        tensors = {k: v.half() if k not in buffers and v.is_floating_point() else v for k, v in tensors.items()}
    meta = make_metadata(CHECKPOINT_KIND, model.config, **{"ldmkit.scale_factor": repr(float(model.scale_factor))})
    meta.update(extra_metadata or {})
    return save_checkpoint(path, tensors, meta)


def load_autoencoder(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Autoencoder:
    """Build an :class:`Autoencoder` from a file written by :func:`save_autoencoder` (no pickle).

    The config is re-validated from the metadata before any tensor is read; weights are loaded
    strictly (float16 files are upcast to float32). The model is returned in eval mode; call
    :meth:`Autoencoder.freeze` to use it as a frozen first stage.
    """
    from pydantic import ValidationError

    from ldmkit.train.checkpoint import CheckpointError, load_checkpoint, load_module_state, metadata_config, read_metadata

    meta = read_metadata(path)
    kind = meta.get("ldmkit.kind")
    if kind != CHECKPOINT_KIND:
        hint = " (a training checkpoint: use the model.safetensors written at the end of training)" if kind else ""
        raise CheckpointError(f"{path} is not an autoencoder file: ldmkit.kind={kind!r}, expected {CHECKPOINT_KIND!r}{hint}")
    try:
        config = AutoencoderConfig.model_validate(metadata_config(path, meta))
    except ValidationError as e:
        raise CheckpointError(f"{path} holds an invalid autoencoder config: {e}") from None
    model = Autoencoder(config)
    load_module_state(model, load_checkpoint(path).tensors, str(path))
    return model.to(device).eval()
