"""The forward (noising) process: β schedules, q(x_t | x_0), parameterizations and the training loss.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239):
``α_t = 1 − β_t``, ``ᾱ_t = Π_{s≤t} α_s`` and ``x_t = √ᾱ_t · x_0 + √(1−ᾱ_t) · ε`` (their Eq. 4), with
timesteps indexed ``0 … T−1`` as in the CompVis code and diffusers (index 0 is the first noising step).

Schedules:

- ``"scaled_linear"`` — what the LDM configs call "linear" (Rombach et al. 2022; CompVis
  ``make_beta_schedule``): ``β_t = linspace(√β_start, √β_end, T)²``. LDM: β_start = 0.0015,
  β_end = 0.0195, T = 1000. Stable Diffusion reuses it with 0.00085 → 0.012.
- ``"cosine"`` — Nichol & Dhariwal 2021, "Improved DDPM" (arXiv:2102.09672), Eq. 17:
  ``ᾱ(t) = f(t)/f(0)``, ``f(t) = cos²(((t/T) + s)/(1 + s) · π/2)``, ``s = 0.008``, and
  ``β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)``.

Like the CompVis code, β and ᾱ are computed in float64 and stored in float32; samplers read the
float32 values back as float64 for their per-step scalar coefficients.

Parameterizations (what the network predicts): ``"eps"`` (the noise, Ho et al. 2020), ``"x0"`` (the
clean data) and ``"v"`` (Salimans & Ho 2022, "Progressive Distillation", arXiv:2202.00512, §4:
``v = √ᾱ·ε − √(1−ᾱ)·x_0``). For a given ``(x_t, t)`` each is an affine function of the others
(:meth:`NoiseSchedule.convert`), so samplers work in ε-space whatever the model predicts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from ldmkit.config import DiffusionConfig

__all__ = ["NoiseSchedule", "Parameterization", "PARAMETERIZATIONS", "scaled_linear_betas", "cosine_betas"]

Parameterization = Literal["eps", "v", "x0"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "v", "x0")


def scaled_linear_betas(timesteps: int, start: float = 0.0015, end: float = 0.0195) -> torch.Tensor:
    """LDM's "linear" schedule: ``β_t = linspace(√start, √end, T)²`` (float64)."""
    if not 0.0 < start < 1.0 or not 0.0 < end < 1.0:
        raise ValueError(f"scaled_linear betas need 0 < start, end < 1; got start={start}, end={end}")
    return torch.linspace(math.sqrt(start), math.sqrt(end), timesteps, dtype=torch.float64) ** 2


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: β from the cos² ᾱ curve, clipped at ``max_beta`` (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(min=0.0, max=max_beta)


class NoiseSchedule:
    """A discrete forward process with ``T`` steps and the network's parameterization.

    Build it from a config (``NoiseSchedule.from_config(cfg.diffusion)``) or from any β sequence
    (``NoiseSchedule(betas, parameterization="v")``).

    Attributes (CPU tensors of length T): ``betas``, ``alphas_cumprod`` (float32, computed in
    float64), ``alphas_cumprod_f64`` (the stored float32 values as float64, for scalar arithmetic).
    """

    def __init__(self, betas: torch.Tensor | Sequence[float], parameterization: Parameterization = "eps"):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {', '.join(PARAMETERIZATIONS)}")
        betas64 = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().flatten()
        if betas64.numel() < 2:
            raise ValueError(f"a schedule needs at least 2 timesteps, got {betas64.numel()}")
        if not bool(((betas64 > 0) & (betas64 < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.parameterization: Parameterization = parameterization
        self.num_timesteps = int(betas64.numel())
        self.betas = betas64.float()
        self.alphas_cumprod = torch.cumprod(1.0 - betas64, dim=0).float()
        self.alphas_cumprod_f64 = self.alphas_cumprod.double()
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: "DiffusionConfig | None" = None, **overrides: Any) -> "NoiseSchedule":
        """From a :class:`~ldmkit.config.DiffusionConfig` (defaults: LDM's T=1000 scaled-linear, ε)."""
        from ldmkit.config import DiffusionConfig

        if config is None:
            config = DiffusionConfig(**overrides)
        elif overrides:
            config = DiffusionConfig.model_validate({**config.model_dump(), **overrides})
        if config.schedule == "scaled_linear":
            betas = scaled_linear_betas(config.timesteps, config.linear_start, config.linear_end)
        elif config.schedule == "cosine":
            betas = cosine_betas(config.timesteps)
        else:  # pragma: no cover - the config's Literal forbids it
            raise ValueError(f"unknown schedule {config.schedule!r}; allowed: scaled_linear, cosine")
        return cls(betas, config.parameterization)

    @property
    def T(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_timesteps}, parameterization={self.parameterization!r})"

    # -- per-timestep coefficients ---------------------------------------------------------------
    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            a = self.alphas_cumprod_f64
            self._cache[key] = (a.sqrt().to(device, dtype), (1.0 - a).sqrt().to(device, dtype))
        return self._cache[key]

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(√ᾱ_t, √(1−ᾱ_t))`` shaped to broadcast against ``like`` (per-sample for a (B,) ``t``)."""
        sqrt_a, sqrt_1ma = self._tables(like.device, like.dtype if like.is_floating_point() else torch.float32)
        t = self._check_t(t, like.device)
        shape = (-1,) + (1,) * (like.dim() - 1) if t.dim() == 1 else ()
        return sqrt_a[t].reshape(shape), sqrt_1ma[t].reshape(shape)

    def _check_t(self, t: torch.Tensor | int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers in [0, {self.num_timesteps}), got dtype {t.dtype}")
        if t.dim() > 1:
            raise ValueError(f"timesteps must be a scalar or a (B,) tensor, got shape {tuple(t.shape)}")
        # range-checked on the CPU only: on an accelerator the check would cost a host sync per call
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps}); got min {int(t.min())}, max {int(t.max())}"
            )
        return t.long()

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio ``ᾱ_t / (1 − ᾱ_t)`` (float64)."""
        a = self.alphas_cumprod_f64[self._check_t(t, torch.device("cpu"))]
        return a / (1.0 - a)

    # -- the forward process ---------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)`` (Ho et al. 2020, Eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``t ~ U{0, …, T−1}``, one per sample (LDM ``p_losses``)."""
        device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)

    # -- parameterizations ------------------------------------------------------------------------
    def convert(
        self,
        prediction: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        src: Parameterization,
        dst: Parameterization,
    ) -> torch.Tensor:
        """Convert a prediction of kind ``src`` at ``(x_t, t)`` to kind ``dst``.

        With ``a = √ᾱ_t`` and ``s = √(1−ᾱ_t)`` (so ``a² + s² = 1``):
        ``x0 = (x_t − s·ε)/a``, ``ε = (x_t − a·x0)/s``, ``v = a·ε − s·x0``, ``x0 = a·x_t − s·v``,
        ``ε = s·x_t + a·v`` (Salimans & Ho 2022, §4 and App. D).
        """
        for name, kind in (("src", src), ("dst", dst)):
            if kind not in PARAMETERIZATIONS:
                raise ValueError(f"unknown {name} parameterization {kind!r}; allowed: {', '.join(PARAMETERIZATIONS)}")
        if src == dst:
            return prediction
        a, s = self.alpha_sigma(t, x_t)
        if src == "eps":
            eps, x0 = prediction, None
        elif src == "x0":
            eps, x0 = None, prediction
        else:  # v
            if dst == "eps":
                return s * x_t + a * prediction
            return a * x_t - s * prediction
        if dst == "eps":
            return (x_t - a * x0) / s
        if dst == "x0":
            return (x_t - s * eps) / a
        # dst == "v"
        if eps is None:
            eps = (x_t - a * x0) / s
        else:
            x0 = (x_t - s * eps) / a
        return a * eps - s * x0

    def to_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
               parameterization: Parameterization | None = None) -> torch.Tensor:
        """The ε implied by a prediction (of ``parameterization``, default the schedule's) at ``(x_t, t)``."""
        return self.convert(prediction, x_t, t, parameterization or self.parameterization, "eps")

    def to_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
              parameterization: Parameterization | None = None) -> torch.Tensor:
        """The x_0 implied by a prediction at ``(x_t, t)``."""
        return self.convert(prediction, x_t, t, parameterization or self.parameterization, "x0")

    def to_v(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
             parameterization: Parameterization | None = None) -> torch.Tensor:
        """The v implied by a prediction at ``(x_t, t)``."""
        return self.convert(prediction, x_t, t, parameterization or self.parameterization, "v")

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int,
               parameterization: Parameterization | None = None) -> torch.Tensor:
        """The regression target for ``parameterization``: ε, x_0, or ``v = √ᾱ ε − √(1−ᾱ) x_0``."""
        kind = parameterization or self.parameterization
        if kind == "eps":
            return noise
        if kind == "x0":
            return x0
        if kind == "v":
            a, s = self.alpha_sigma(t, x0)
            return a * noise - s * x0
        raise ValueError(f"unknown parameterization {kind!r}; allowed: {', '.join(PARAMETERIZATIONS)}")

    # -- training ---------------------------------------------------------------------------------
    def training_loss(
        self,
        model_fn: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        loss_type: Literal["l2", "l1"] = "l2",
        reduction: Literal["mean", "none"] = "mean",
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """The "simple" loss of Ho et al. 2020 (Eq. 14) on the configured target (LDM ``p_losses``).

        ``t`` defaults to :meth:`sample_timesteps`, ``noise`` to ``N(0, I)`` (both from ``generator``
        when given). ``model_fn(x_t, t, **model_kwargs)`` must return the schedule's parameterization.
        The per-sample loss is the mean over every non-batch dimension of ``(pred − target)²``
        (``loss_type="l2"``) or ``|pred − target|`` (``"l1"``, used by several LDM configs);
        ``reduction="mean"`` averages it over the batch, ``"none"`` returns the ``(B,)`` vector.
        """
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"unknown loss_type {loss_type!r}; allowed: l2, l1")
        if reduction not in ("mean", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
        batch = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(batch, generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        x_t = self.q_sample(x0, t, noise)
        prediction = model_fn(x_t, t, **model_kwargs)
        target = self.target(x0, noise, t)
        if prediction.shape != target.shape:
            raise ValueError(
                f"model output shape {tuple(prediction.shape)} differs from the target's {tuple(target.shape)}"
            )
        if loss_type == "l2":
            per_element = F.mse_loss(prediction, target, reduction="none")
        else:
            per_element = F.l1_loss(prediction, target, reduction="none")
        per_sample = per_element.reshape(batch, -1).mean(dim=1)
        return per_sample.mean() if reduction == "mean" else per_sample
