"""PatchGAN discriminator (Isola et al. 2017, "NLayerDiscriminator"), as used by VQGAN and the LDM
first stage.

A stack of 4x4 convolutions: one stride-2 conv without normalization, ``n_layers - 1`` more stride-2
convs with normalization, one stride-1 conv with normalization, and a stride-1 conv to a single logit
channel. Every output location judges one receptive-field patch of the input (70x70 pixels for
``n_layers=3``), so the output is a map of real/fake logits, not a single number. Channel width doubles
per layer up to ``8 * ndf``. LeakyReLU(0.2) throughout; weights initialized N(0, 0.02) (norm scales
N(1, 0.02)) as in pix2pix.

For 32x32 images ``n_layers=2`` gives a 6x6 logit map (34x34-pixel receptive field) (``n_layers=3``: 2x2).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

__all__ = ["DiscriminatorConfig", "NLayerDiscriminator"]


class DiscriminatorConfig(BaseModel):
    """Hyper-parameters of :class:`NLayerDiscriminator`. Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = Field(3, gt=0, description="image channels")
    ndf: int = Field(64, gt=0, description="channels of the first layer (doubled per layer, at most 8x)")
    n_layers: int = Field(3, ge=1, le=6, description="number of stride-2 layers")
    norm: Literal["batch", "group", "none"] = Field(
        "batch", description="normalization after the inner convs: BatchNorm (reference), GroupNorm, or none"
    )


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images (B, C, H, W) -> patch logits (B, 1, h, w)."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = cfg = config or DiscriminatorConfig()
        use_bias = cfg.norm == "none"  # a norm layer's shift makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [
                nn.Conv2d(cfg.ndf * prev, cfg.ndf * mult, 4, stride, 1, bias=use_bias),
                _norm_layer(cfg.norm, cfg.ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(cfg.ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
