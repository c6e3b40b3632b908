"""Samplers: plain functions with one signature, in the style of k-diffusion.

Every sampler is::

    sampler(denoise, x, schedule, *, steps, generator=None, callback=None, **opts) -> x_0

- ``denoise(x_t, t) -> ε`` is an ε-space callable; ``t`` is a ``(B,)`` long tensor of timesteps in
  ``[0, T)``. Wrap a v- or x0-predicting model with :func:`as_eps_denoiser` (and a guided model with
  :class:`ldmkit.diffusion.guidance.GuidedDenoiser` first).
- ``x`` is the starting sample at the first timestep of the sampler's grid (usually ``N(0, I)``).
- ``schedule`` is a :class:`~ldmkit.diffusion.schedule.NoiseSchedule`.
- ``steps`` (``1 … T``) is the number of grid timesteps. The number of model evaluations (NFE) is
  ``steps`` for every sampler except PLMS (``steps + 1``: its first step is a two-evaluation
  pseudo improved Euler step).
- ``generator`` feeds the noise of stochastic samplers (DDPM, DDIM with η > 0).
- ``callback(info)`` is called after every step with ``info = {"i", "t", "x", "denoised", "nfe"}``:
  the step index, the timestep just processed, the new sample, the x_0 prediction at that step and the
  number of model evaluations so far.

Timestep grids (:func:`spaced_timesteps`; see ``docs/diffusion.md``):

- ``"leading"`` — ``t_i = i·(T // S) + offset``, ``i = 0 … S−1``, descending. With ``offset=1``
  this is LDM's ``make_ddim_timesteps(ddim_discretize="uniform")`` (S=50: 981, 961, …, 1) whenever
  T is divisible by S, and always diffusers' ``timestep_spacing="leading", steps_offset=1``
  (LDM's own code returns one extra step when T % S ≠ 0; we always return exactly S).
- ``"linspace"`` — ``round(linspace(0, T−1, S))``, descending (diffusers ``"linspace"``).
- ``"trailing"`` — ``round(arange(T, 0, −T/S)) − 1`` (diffusers ``"trailing"``; Lin et al. 2024,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", Tab. 2). With S = T it is T−1 … 0.

``offset`` only applies to ``"leading"``. Samplers are wrapped in ``torch.no_grad`` and work under
``torch.inference_mode``; they never modify ``x`` in place.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Literal

import numpy as np
import torch

from ldmkit.diffusion.schedule import NoiseSchedule, Parameterization

__all__ = [
    "Denoiser",
    "Callback",
    "Spacing",
    "SAMPLERS",
    "as_eps_denoiser",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_plms",
    "sampler_timesteps",
    "spaced_timesteps",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], Any]
Spacing = Literal["leading", "linspace", "trailing"]
SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")


# -- adapting models ------------------------------------------------------------------------------
def as_eps_denoiser(
    model_fn: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    parameterization: Parameterization | None = None,
) -> Denoiser:
    """Wrap ``model_fn(x_t, t) -> prediction`` (ε, v or x0) as an ε-space denoiser.

    ``parameterization`` defaults to the schedule's. An ε model is returned unchanged.
    """
    kind = parameterization or schedule.parameterization
    if kind == "eps":
        return model_fn

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.to_eps(model_fn(x_t, t), x_t, t, kind)

    denoise.__wrapped__ = model_fn  # type: ignore[attr-defined]
    return denoise


# -- timestep grids -------------------------------------------------------------------------------
def _check_steps(steps: Any, num_timesteps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an integer in 1..{num_timesteps}, got {steps!r}")
    steps = int(steps)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps} (the schedule's T), got {steps}")
    return steps


def spaced_timesteps(steps: int, num_timesteps: int, spacing: Spacing = "leading", offset: int = 1) -> list[int]:
    """``steps`` descending integer timesteps in ``[0, num_timesteps)`` (see the module docstring).

    The arithmetic is diffusers' ``DDIMScheduler.set_timesteps`` (numpy, same rounding), so grids
    agree exactly. Raises a ``ValueError`` naming the fix when the grid would leave ``[0, T)`` or
    repeat a timestep (e.g. ``"leading"`` with ``offset=1`` and ``steps == T``).
    """
    steps = _check_steps(steps, num_timesteps)
    if spacing == "leading":
        ratio = num_timesteps // steps
        grid = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + int(offset)
    elif spacing == "linspace":
        grid = np.linspace(0, num_timesteps - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        grid = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    out = [int(t) for t in grid]
    _check_grid(out, num_timesteps, f"steps={steps}, spacing={spacing!r}, offset={offset}")
    return out


def _check_grid(grid: list[int], num_timesteps: int, what: str) -> None:
    if not grid:
        raise ValueError(f"{what} gives no timesteps")
    if grid[0] >= num_timesteps or grid[-1] < 0:
        raise ValueError(
            f"{what} gives timesteps {grid[-1]}..{grid[0]}, outside [0, {num_timesteps}); "
            "use fewer steps, offset=0 or spacing='trailing'"
        )
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{what} repeats timesteps; use fewer steps or spacing='trailing'")


def _dpm_grid(steps: int, num_timesteps: int, spacing: Spacing, offset: int) -> list[int]:
    """DPM-Solver's grid as in diffusers' ``DPMSolverMultistepScheduler.set_timesteps``.

    ``"leading"``/``"linspace"`` take S+1 points and drop the smallest (whose place the final σ = 0
    takes); ``"trailing"`` takes S points.
    """
    steps = _check_steps(steps, num_timesteps)
    if spacing == "trailing":
        return spaced_timesteps(steps, num_timesteps, spacing, offset)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    if spacing == "leading":
        ratio = num_timesteps // (steps + 1)
        grid = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(offset)
    else:
        grid = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    out = [int(t) for t in grid]
    _check_grid(out, num_timesteps, f"steps={steps}, spacing={spacing!r}, offset={offset} (DPM-Solver grid)")
    return out


# -- shared helpers -------------------------------------------------------------------------------
def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor of shape (B, ...)")


def _tvec(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _eval(denoise: Denoiser, x: torch.Tensor, t: int) -> torch.Tensor:
    eps = denoise(x, _tvec(t, x))
    if eps.shape != x.shape:
        raise ValueError(f"denoise returned shape {tuple(eps.shape)} for an input of shape {tuple(x.shape)}")
    return eps


def _report(callback: Callback | None, i: int, t: int, x: torch.Tensor, denoised: torch.Tensor, nfe: int) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "denoised": denoised, "nfe": nfe})


def _ddim_transfer(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float,
                   sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM's deterministic part (Song et al. 2021, Eq. 12): returns ``(mean of x_prev, x0 prediction)``."""
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    return x_prev, x0


# -- samplers ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    spacing: Spacing = "trailing",
    offset: int = 1,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Alg. 2).

    Each step draws from the posterior ``q(x_s | x_t, x̂_0)`` (their Eq. 6–7, the "fixed small"
    variance β̃ that LDM uses) with ``x̂_0`` from the predicted ε; on a sub-grid of S < T timesteps
    the per-step β is ``1 − ᾱ_t/ᾱ_s`` ("respacing", Nichol & Dhariwal 2021, §4). The last step goes to
    ``ᾱ = 1`` without noise, i.e. returns ``x̂_0``. The default ``spacing="trailing"`` with
    ``steps=T`` visits T−1 … 0: LDM's 1000-step ``p_sample_loop``. NFE = ``steps``.
    """
    _check_x(x)
    grid = spaced_timesteps(steps, schedule.num_timesteps, spacing, offset)
    abar = schedule.alphas_cumprod_f64
    for i, t in enumerate(grid):
        a_t = float(abar[t])
        a_s = float(abar[grid[i + 1]]) if i + 1 < len(grid) else 1.0
        eps = _eval(denoise, x, t)
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        beta = 1.0 - a_t / a_s
        coef_x0 = math.sqrt(a_s) * beta / (1.0 - a_t)
        coef_xt = math.sqrt(a_t / a_s) * (1.0 - a_s) / (1.0 - a_t)
        x = coef_x0 * x0 + coef_xt * x
        variance = (1.0 - a_s) / (1.0 - a_t) * beta
        if variance > 0.0:
            x = x + math.sqrt(variance) * _noise(x, generator)
        _report(callback, i, t, x, x0, i + 1)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
    spacing: Spacing = "leading",
    offset: int = 1,
    set_alpha_to_one: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

    ``x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε + σ z`` with
    ``σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)``; η = 0 is deterministic, η = 1 is DDPM's
    posterior. ``s`` is the next grid timestep; after the last one ``ᾱ_s = ᾱ_0`` (LDM's
    ``alphas_prev[0]``, diffusers' ``set_alpha_to_one=False``) or 1 with ``set_alpha_to_one=True``.
    Defaults (``"leading"``, ``offset=1``) are LDM's ``DDIMSampler`` and Stable Diffusion's
    ``DDIMScheduler``. With η > 0 one noise tensor is drawn per step, every step, in diffusers' order.
    NFE = ``steps``.
    """
    _check_x(x)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    grid = spaced_timesteps(steps, schedule.num_timesteps, spacing, offset)
    abar = schedule.alphas_cumprod_f64
    final = 1.0 if set_alpha_to_one else float(abar[0])
    for i, t in enumerate(grid):
        a_t = float(abar[t])
        a_prev = float(abar[grid[i + 1]]) if i + 1 < len(grid) else final
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        eps = _eval(denoise, x, t)
        x, x0 = _ddim_transfer(x, eps, a_t, a_prev, sigma)
        if eta > 0:
            x = x + sigma * _noise(x, generator)
        _report(callback, i, t, x, x0, i + 1)
    return x


@torch.no_grad()
def sample_plms(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    spacing: Spacing = "leading",
    offset: int = 1,
    set_alpha_to_one: bool = False,
) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", arXiv:2202.09778, Eq. 11–12), as in LDM's ``PLMSSampler``.

    The transfer is the deterministic DDIM step (η = 0) on the same grid as :func:`sample_ddim`. The
    first step is a pseudo improved Euler step (ε' = (ε_t + ε(x_next, t_next))/2, two evaluations);
    then Adams–Bashforth of order 2, 3 and 4 on the stored ε history:
    ``(3ε_0 − ε_1)/2``, ``(23ε_0 − 16ε_1 + 5ε_2)/12``, ``(55ε_0 − 59ε_1 + 37ε_2 − 9ε_3)/24``.
    NFE = ``steps + 1``. (With ``steps=1`` the extra evaluation is at t = 0, where LDM re-uses the
    first timestep.) ``generator`` is unused (deterministic).
    """
    _check_x(x)
    grid = spaced_timesteps(steps, schedule.num_timesteps, spacing, offset)
    abar = schedule.alphas_cumprod_f64
    final = 1.0 if set_alpha_to_one else float(abar[0])
    history: list[torch.Tensor] = []  # ε at previous steps, most recent first
    nfe = 0
    for i, t in enumerate(grid):
        a_t = float(abar[t])
        t_next = grid[i + 1] if i + 1 < len(grid) else 0
        a_prev = float(abar[t_next]) if i + 1 < len(grid) else final
        eps = _eval(denoise, x, t)
        nfe += 1
        if not history:
            x_mid, _ = _ddim_transfer(x, eps, a_t, a_prev)
            eps_next = _eval(denoise, x_mid, t_next)
            nfe += 1
            eps_prime = (eps + eps_next) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[0]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[0] + 5 * history[1]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[0] + 37 * history[1] - 9 * history[2]) / 24
        x, x0 = _ddim_transfer(x, eps_prime, a_t, a_prev)
        history = [eps] + history[:2]
        _report(callback, i, t, x, x0, nfe)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    spacing: Spacing = "linspace",
    offset: int = 1,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", arXiv:2211.01095, Alg. 2): second-order multistep on the data prediction.

    With ``α = √ᾱ``, ``σ = √(1−ᾱ)``, ``λ = log(α/σ)``, ``h_i = λ_{i+1} − λ_i`` and
    ``x̂_0`` the x_0 prediction::

        D_i = x̂_0^(i) + (x̂_0^(i) − x̂_0^(i−1)) / (2 r_i),   r_i = h_{i−1} / h_i
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h_i} − 1) D_i

    The first step is first order (``D_0 = x̂_0^(0)``, DPM-Solver++(1) = DDIM). The grid is diffusers'
    ``DPMSolverMultistepScheduler`` grid (default ``"linspace"``, its default) followed by σ = 0
    (``final_sigmas_type="zero"``): the last step is first order and returns the x_0 prediction, as
    diffusers does with ``solver_order=2, lower_order_final=True`` (the midpoint ``solver_type``).
    ``generator`` is unused (deterministic). NFE = ``steps``.
    """
    _check_x(x)
    grid = _dpm_grid(steps, schedule.num_timesteps, spacing, offset)
    abar = schedule.alphas_cumprod_f64
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for i, t in enumerate(grid):
        a_s = float(abar[t])
        alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1.0 - a_s)
        eps = _eval(denoise, x, t)
        x0 = (x - sigma_s * eps) / alpha_s
        if i + 1 == len(grid):
            x_new = x0  # σ_next = 0: the first-order step lands exactly on the x_0 prediction
        else:
            a_n = float(abar[grid[i + 1]])
            alpha_n, sigma_n = math.sqrt(a_n), math.sqrt(1.0 - a_n)
            h = math.log(alpha_n / sigma_n) - math.log(alpha_s / sigma_s)
            d = x0
            if prev_x0 is not None:
                r = prev_h / h
                d = x0 + (x0 - prev_x0) / (2.0 * r)
            x_new = (sigma_n / sigma_s) * x - (alpha_n * math.expm1(-h)) * d
            prev_h = h
        prev_x0 = x0
        x = x_new
        _report(callback, i, t, x, x0, i + 1)
    return x


# -- registry --------------------------------------------------------------------------------------
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered as ``name``; a ``KeyError`` lists the allowed names."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}") from None


def sampler_timesteps(
    name: str, schedule: NoiseSchedule | int, steps: int, *, spacing: Spacing | None = None, offset: int = 1
) -> list[int]:
    """The grid of timesteps sampler ``name`` visits (``spacing`` defaults to the sampler's own).

    ``grid[0]`` is the timestep the starting sample ``x`` is taken to be at.
    """
    fn = get_sampler(name)
    num = schedule if isinstance(schedule, int) else schedule.num_timesteps
    if spacing is None:
        spacing = inspect.signature(fn).parameters["spacing"].default
    if fn is sample_dpmpp_2m:
        return _dpm_grid(steps, num, spacing, offset)
    return spaced_timesteps(steps, num, spacing, offset)
