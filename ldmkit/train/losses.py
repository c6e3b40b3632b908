"""Losses for training the first stage (Rombach et al. 2022, App. G; Esser et al. 2021, VQGAN).

The autoencoder minimizes

    L_AE = L_rec + w_reg * L_reg + lambda * disc_factor * L_G

- ``L_rec``: per-pixel L1 (mean; ``pixel_loss="l2"`` for the squared error, as the reference's
  ``pixel_loss`` option), plus ``perceptual_weight * LPIPS`` when a :class:`PerceptualLoss` with local
  weights is given;
- ``L_reg``: KL to N(0, I) **per pixel** -- the per-image KL sum divided by the number of image
  values C*H*W -- weighted by ``kl_weight`` (~1e-6), or the VQ codebook + commitment loss weighted by
  ``codebook_weight``. (The reference code sums the L1 over pixels and the KL over latents; dividing both
  by C*H*W gives the same balance with a mean L1, so ``kl_weight`` keeps its reference value.)
- ``L_G = -mean(D(x_hat))`` (hinge generator loss), with the adaptive weight
  ``lambda = ||grad_w L_rec|| / (||grad_w L_G|| + 1e-4)``, clamped to [0, 1e4] and times
  ``disc_weight``, where ``w`` is the decoder's last layer weight; ``disc_factor`` is 0 before
  ``disc_start`` steps and 1 after.

The discriminator minimizes the hinge loss ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.models.autoencoder import AutoencoderOutput

__all__ = [
    "l1_loss",
    "l2_loss",
    "kl_per_pixel",
    "hinge_d_loss",
    "hinge_g_loss",
    "adaptive_weight",
    "disc_factor",
    "FirstStageLoss",
    "PerceptualLoss",
]


def l1_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean absolute error."""
    return (x - x_hat).abs().mean()


def l2_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean squared error."""
    return (x - x_hat).pow(2).mean()


def kl_per_pixel(kl_per_image: Tensor, image: Tensor) -> Tensor:
    """Mean per-image KL (summed over the latent) divided by the number of image values C*H*W."""
    return kl_per_image.mean() / image[0].numel()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss of the hinge GAN: -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, disc_weight: float = 1.0, max_weight: float = 1e4
) -> Tensor:
    """lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4) at ``last_layer``, clamped to [0, max], detached.

    Balances the GAN gradient against the reconstruction gradient where both enter the decoder's
    output (VQGAN eq. 7). Both losses must still have their graphs (they are retained).
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(g_rec) / (torch.norm(g_gan) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach() * disc_weight


def disc_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """``factor`` once ``step >= disc_start``, else 0 (the discriminator is off)."""
    return factor if step >= disc_start else 0.0


@dataclass
class LossWeights:
    """The scalar weights of :class:`FirstStageLoss` (see the module docstring)."""

    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 0
    perceptual_weight: float = 0.0
    pixel_loss: str = "l1"  # "l1" or "l2"


class FirstStageLoss(nn.Module):
    """Autoencoder + discriminator objectives. Holds the discriminator and the optional perceptual loss.

    Use :meth:`generator_loss` for the autoencoder step and :meth:`discriminator_loss` for the
    discriminator step; both return ``(loss, logs)`` with float logs.
    """

    def __init__(self, discriminator: nn.Module, weights: LossWeights, perceptual: PerceptualLoss | None = None):
        super().__init__()
        self.discriminator = discriminator
        self.weights = weights
        if weights.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {weights.pixel_loss!r}")
        if weights.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a PerceptualLoss (built from a local weights file)")
        self.perceptual = perceptual

    def disc_active(self, step: int) -> bool:
        """Whether the GAN terms are on at ``step`` (0-based count of completed steps)."""
        return step >= self.weights.disc_start

    def generator_loss(
        self, x: Tensor, out: AutoencoderOutput, last_layer: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """L_AE for one batch; the discriminator is not updated (its grads are not requested)."""
        w = self.weights
        x_hat = out.reconstruction
        l1 = l1_loss(x, x_hat)
        rec = l1 if w.pixel_loss == "l1" else l2_loss(x, x_hat)
        logs: dict[str, float] = {"l1": float(l1.detach())}
        if self.perceptual is not None and w.perceptual_weight > 0:
            p = self.perceptual(x, x_hat).mean()
            rec = rec + w.perceptual_weight * p
            logs["perceptual"] = float(p.detach())
        if out.posterior is not None:
            reg = kl_per_pixel(out.reg_loss, x)  # reg_loss is already the batch-mean per-image KL
            total = rec + w.kl_weight * reg
            logs["kl"] = float(out.reg_loss.detach())
        else:
            total = rec + w.codebook_weight * out.reg_loss
            logs["codebook"] = float(out.reg_loss.detach())
        if self.disc_active(step):
            self.discriminator.requires_grad_(False)
            g = hinge_g_loss(self.discriminator(x_hat))
            self.discriminator.requires_grad_(True)
            if self.training:
                lam = adaptive_weight(rec, g, last_layer, disc_weight=w.disc_weight)
            else:  # no graph to differentiate (e.g. validation)
                lam = torch.tensor(0.0)
            total = total + lam * g
            logs.update(g_loss=float(g.detach()), d_weight=float(lam))
        logs["loss"] = float(total.detach())
        return total, logs

    def discriminator_loss(self, x: Tensor, x_hat: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Hinge loss of the discriminator on real ``x`` and detached reconstructions (0 before the start)."""
        real = self.discriminator(x.detach())
        fake = self.discriminator(x_hat.detach())
        loss = disc_factor(step, self.weights.disc_start) * hinge_d_loss(real, fake)
        return loss, {
            "d_loss": float(loss.detach()),
            "logits_real": float(real.detach().mean()),
            "logits_fake": float(fake.detach().mean()),
        }


# ---------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS-style, weights from a local file only)

#: VGG16 ``features`` layout (torchvision): channels, or "M" for max-pool. LPIPS taps relu1_2 ... relu5_3.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices in ``features`` of the ReLUs LPIPS reads
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance with a VGG16 backbone whose weights come **only** from a local file.

    ``weights_path`` is a ``.safetensors`` file with torchvision-named VGG16 conv weights
    (``features.{i}.weight`` / ``.bias``) and, optionally, LPIPS' linear heads ``lin{k}.model.1.weight``
    (k = 0..4, shape (1, C_k, 1, 1)); without heads, every channel weighs 1/C_k. Nothing is downloaded
    and nothing is unpickled; no default recipe uses this class. The backbone is frozen.

    Distance per image: sum over the 5 taps of the spatial mean of
    ``sum_c w_c * (f_hat(x) - f_hat(y))^2`` where ``f_hat`` is unit-normalized over channels.
    Inputs are images in [-1, 1].
    """

    def __init__(self, weights_path: str | os.PathLike[str]):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual loss weights not found at {path}: this loss needs a local .safetensors file with "
                "VGG16 'features.*' weights (nothing is downloaded); set perceptual_weight: 0 to train without it"
            )
        from ldmkit.train.checkpoint import load_checkpoint

        tensors = load_checkpoint(path).tensors
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        want = {f"features.{k}" for k in self.features.state_dict()}
        missing = sorted(want - set(tensors))
        if missing:
            raise ValueError(f"{path} is not a VGG16 weights file: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        self.features.load_state_dict({k[len("features.") :]: tensors[k] for k in want})
        chans = [64, 128, 256, 512, 512]
        heads = []
        for k, c in enumerate(chans):
            w = tensors.get(f"lin{k}.model.1.weight")
            heads.append(w.reshape(1, c, 1, 1).float() if w is not None else torch.full((1, c, 1, 1), 1.0 / c))
        for k, w in enumerate(heads):
            self.register_buffer(f"head{k}", w)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:  # the backbone always stays in eval mode
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i >= _TAPS[-1]:
                break
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance (B,)."""
        dist = x.new_zeros(x.shape[0])
        for k, (a, b) in enumerate(zip(self._taps(x), self._taps(y))):
            head = getattr(self, f"head{k}")
            dist = dist + ((a - b).pow(2) * head).sum(1).mean(dim=(1, 2))
        return dist
