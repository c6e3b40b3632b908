"""Samplers: grids, the shared interface, exactness on Gaussian data, and step-for-step parity with diffusers.

Gaussian data (``x_0 ~ N(μ, Σ)``, d = 4, non-diagonal Σ with eigenvalues ≈ 0.12 … 3.4) has a closed-form
optimal denoiser: with ``a = √ᾱ_t``, ``s = √(1−ᾱ_t)``,
``E[x_0|x_t] = μ + aΣ(a²Σ + s²I)⁻¹(x_t − aμ)`` and ``ε*(x_t, t) = (x_t − a·E[x_0|x_t]) / s``.
The starting sample is drawn from the exact marginal ``q(x_t)`` at the sampler's first grid timestep, so
what remains is the sampler's own discretization error (plus Monte-Carlo error where we sample).
The target is ``N(√ᾱ_f μ, ᾱ_f Σ + (1−ᾱ_f) I)`` at the sampler's final level ``ᾱ_f``: ᾱ_0 for DDIM/PLMS
(LDM's ``alphas_prev[0]``), 1 for DDPM and DPM-Solver++ (they end on the x_0 prediction).
"""

import math

import pytest
import torch

from ldmkit.diffusion import (
    SAMPLERS,
    NoiseSchedule,
    as_eps_denoiser,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
    sampler_timesteps,
    spaced_timesteps,
)

D = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny (≤ 20 000 × 4): one thread is fastest and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config()


class Gaussian:
    """N(μ, Σ) data and its exact ε-denoiser, precomputed for every timestep (float64)."""

    def __init__(self, schedule):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.sigma = a @ a.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
        self.mu = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
        self.schedule = schedule
        eye = torch.eye(D, dtype=torch.float64)
        abar = schedule.alphas_cumprod_f64
        sa, ss = abar.sqrt()[:, None, None], (1 - abar).sqrt()[:, None, None]
        cov_t = sa**2 * self.sigma + ss**2 * eye  # (T, D, D)
        gain = sa * torch.linalg.solve(cov_t, self.sigma.expand_as(cov_t)).transpose(1, 2)  # aΣ C⁻¹
        # ε* = M x + b   with   M = (I − a·K)/s,  b = −a(μ − a·K μ)/s
        self.m = (eye - sa * gain) / ss
        self.b = (-sa[:, :, 0] * (self.mu - sa[:, :, 0] * (gain @ self.mu))) / ss[:, :, 0]
        self.calls = 0

    def eps(self, x, t):
        self.calls += 1
        if bool((t == t[0]).all()):  # the samplers' case: one timestep for the whole batch
            return x @ self.m[t[0]].T + self.b[t[0]]
        return torch.einsum("bij,bj->bi", self.m[t], x) + self.b[t]

    def marginal(self, abar_t):
        eye = torch.eye(D, dtype=torch.float64)
        return math.sqrt(abar_t) * self.mu, abar_t * self.sigma + (1 - abar_t) * eye

    def start(self, name, steps, n, generator, **opts):
        t0 = sampler_timesteps(name, self.schedule, steps, **opts)[0]
        mean, cov = self.marginal(float(self.schedule.alphas_cumprod_f64[t0]))
        z = torch.randn(n, D, generator=generator, dtype=torch.float64)
        return mean + z @ torch.linalg.cholesky(cov).T

    def target(self, name):
        final = 1.0 if name in ("ddpm", "dpmpp_2m") else float(self.schedule.alphas_cumprod_f64[0])
        return self.marginal(final)


@pytest.fixture(scope="module")
def gaussian(schedule):
    return Gaussian(schedule)


def _errors(mean, cov, target):
    t_mean, t_cov = target
    return (mean - t_mean).abs().max().item(), ((cov - t_cov).norm() / t_cov.norm()).item()


# -- (a) Monte-Carlo: samples match the data distribution ----------------------------------------
# Tolerances: max |mean error| < 0.05 and ‖Cov − Σ‖_F / ‖Σ‖_F < 0.10 with N = 10 000 samples (Monte-Carlo
# noise on the covariance ≈ 0.015). Steps are chosen so the sampler's own bias is at most about a third
# of the tolerance: DDIM is first order and shrinks the variance by O(1/S) (5.6 % at 50 steps, 2.8 % at
# 100, measured exactly below), so it runs 100 steps; PLMS and DPM-Solver++(2M) 50 steps; ancestral
# sampling with the "fixed small" variance β̃ under-disperses at coarse grids (≈ 10 % at 50 steps,
# ≈ 3 % at 250), so DDPM and DDIM(η=1) run 250 steps.
MC_CASES = [
    ("ddim", 100, {}),
    ("plms", 50, {}),
    ("dpmpp_2m", 50, {}),
    ("ddpm", 250, {}),
    ("ddim", 250, {"eta": 1.0}),
]


@pytest.mark.parametrize("name,steps,opts", MC_CASES, ids=[f"{n}-{s}-{o}" for n, s, o in MC_CASES])
def test_samples_match_gaussian_data(gaussian, schedule, name, steps, opts):
    g = torch.Generator().manual_seed(1234)
    x = gaussian.start(name, steps, 10_000, g)
    out = get_sampler(name)(gaussian.eps, x, schedule, steps=steps, generator=g, **opts)
    mean_err, cov_err = _errors(out.mean(0), torch.cov(out.T), gaussian.target(name))
    assert mean_err < 0.05, (name, mean_err)
    assert cov_err < 0.10, (name, cov_err)


@pytest.mark.slow
def test_full_ddpm_chain_matches_gaussian_data(gaussian, schedule):
    """LDM's 1000-step ancestral chain (T−1 … 0): tighter, ‖ΔCov‖/‖Σ‖ < 0.05 (measured ≈ 0.01)."""
    g = torch.Generator().manual_seed(99)
    x = gaussian.start("ddpm", 1000, 10_000, g)
    out = sample_ddpm(gaussian.eps, x, schedule, steps=1000, generator=g)
    mean_err, cov_err = _errors(out.mean(0), torch.cov(out.T), gaussian.target("ddpm"))
    assert mean_err < 0.03 and cov_err < 0.05, (mean_err, cov_err)


def test_sensitivity_an_off_by_one_step_bug_fails_the_tolerance(gaussian, schedule):
    """The tolerance above is meaningful: the model queried one grid step (20 timesteps) late misses it."""
    g = torch.Generator().manual_seed(5)
    x = gaussian.start("dpmpp_2m", 50, 10_000, g)
    out = sample_dpmpp_2m(lambda x, t: gaussian.eps(x, (t + 20).clamp(max=999)), x, schedule, steps=50)
    mean_err, cov_err = _errors(out.mean(0), torch.cov(out.T), gaussian.target("dpmpp_2m"))
    assert mean_err > 0.05 and cov_err > 0.10, (mean_err, cov_err)


# -- (a') exact: deterministic samplers are affine maps on Gaussian data ----------------------------
def _exact_moments(gaussian, name, steps, **opts):
    """Push the start distribution through the (affine) sampler exactly: out = P x + q."""
    schedule = gaussian.schedule
    basis = torch.cat([torch.zeros(1, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)])
    out = get_sampler(name)(gaussian.eps, basis, schedule, steps=steps, **opts)
    q, p = out[0], (out[1:] - out[0]).T
    t0 = sampler_timesteps(name, schedule, steps, **opts)[0]
    mean, cov = gaussian.marginal(float(schedule.alphas_cumprod_f64[t0]))
    return p @ mean + q, p @ cov @ p.T


# (name, steps, bound on the relative covariance error); measured: DDIM 0.056/0.014, PLMS 0.0009/0.0034,
# DPM-Solver++(2M) 0.0136 (its last step jumps to E[x_0|x_t] from t = 20, which drops the residual
# posterior variance: the diffusers final_sigmas_type="zero" convention).
EXACT_CASES = [("ddim", 50, 0.07), ("ddim", 200, 0.02), ("plms", 25, 0.005), ("plms", 50, 0.0015),
               ("dpmpp_2m", 50, 0.02)]


@pytest.mark.parametrize("name,steps,bound", EXACT_CASES)
def test_deterministic_samplers_exact_moments(gaussian, name, steps, bound):
    mean, cov = _exact_moments(gaussian, name, steps)
    mean_err, cov_err = _errors(mean, cov, gaussian.target(name))
    assert mean_err < 1e-9  # the mean path is exact for every sampler
    assert cov_err < bound, (name, steps, cov_err)


# The cosine schedule (Nichol & Dhariwal 2021), measured: DDIM-50 0.053, DDIM-200 0.014, PLMS-50 0.0034,
# DPM-Solver++(2M)-50 0.0079 relative covariance error; the mean path stays exact.
COSINE_CASES = [("ddim", 50, 0.07), ("ddim", 200, 0.02), ("plms", 50, 0.005), ("dpmpp_2m", 50, 0.012)]


@pytest.mark.parametrize("name,steps,bound", COSINE_CASES)
def test_deterministic_samplers_exact_moments_on_the_cosine_schedule(name, steps, bound):
    gaussian = Gaussian(NoiseSchedule.from_config(schedule="cosine"))
    mean, cov = _exact_moments(gaussian, name, steps)
    mean_err, cov_err = _errors(mean, cov, gaussian.target(name))
    assert mean_err < 1e-9 and cov_err < bound, (name, steps, mean_err, cov_err)


def test_convergence_orders(gaussian):
    """DDIM is first order (error halves when steps double); PLMS is higher order."""
    err = {
        (n, s): _errors(*_exact_moments(gaussian, n, s), gaussian.target(n))[1]
        for n in ("ddim", "plms")
        for s in (25, 50, 100)
    }
    for s in (25, 50):
        assert 0.4 < err[("ddim", 2 * s)] / err[("ddim", s)] < 0.6
        assert err[("plms", 2 * s)] / err[("plms", s)] < 0.3


# -- relations between samplers --------------------------------------------------------------------
def test_ddpm_equals_ddim_eta_one_ending_at_alpha_one(gaussian, schedule):
    """DDIM with η = 1 is DDPM's posterior (Song et al. 2021, §4.1); same noise stream, same samples."""
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_ddpm(gaussian.eps, x, schedule, steps=20, spacing="leading",
                    generator=torch.Generator().manual_seed(7))
    b = sample_ddim(gaussian.eps, x, schedule, steps=20, eta=1.0, set_alpha_to_one=True,
                    generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dpmpp_first_step_is_ddim(gaussian, schedule):
    """DPM-Solver++(1) = DDIM (Lu et al. 2022, §3.1): the first multistep step equals a DDIM step."""
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = sampler_timesteps("dpmpp_2m", schedule, 10)
    seen = []
    sample_dpmpp_2m(gaussian.eps, x, schedule, steps=10, callback=seen.append)
    abar = schedule.alphas_cumprod_f64
    a_t, a_s = float(abar[grid[0]]), float(abar[grid[1]])
    eps = gaussian.eps(x, torch.full((8,), grid[0]))
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(seen[0]["x"], math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps)


def test_parameterizations_give_the_same_samples(gaussian, schedule):
    """A v- or x0-model wrapped by as_eps_denoiser samples exactly like the equivalent ε-model."""
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = sample_dpmpp_2m(gaussian.eps, x, schedule, steps=12)
    for kind in ("v", "x0"):
        model = lambda x_t, t, kind=kind: schedule.convert(gaussian.eps(x_t, t), x_t, t, "eps", kind)  # noqa: E731
        out = sample_dpmpp_2m(as_eps_denoiser(model, schedule, kind), x, schedule, steps=12)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert as_eps_denoiser(gaussian.eps, schedule) == gaussian.eps  # ε models pass through


# -- (b) step-for-step parity with diffusers --------------------------------------------------------
LDM_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")


def toy_model(schedule):
    """A smooth, t-dependent, nonlinear ε model with O(1) outputs (near-optimal for N(0, 0.5 I) data)."""
    abar = schedule.alphas_cumprod_f64

    def model(x, t):
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = abar.to(x.dtype)[t].view(shape)
        tt = t.to(x.dtype).view(shape)
        return (1 - a).sqrt() * x / (0.5 * a + 1 - a) + 0.05 * torch.tanh(x) * torch.cos(tt / 100)

    return model


def _run_diffusers(scheduler, model, x, steps, **step_kwargs):
    scheduler.set_timesteps(steps)
    xs = []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
        xs.append(x)
    return scheduler.timesteps.tolist(), xs


def _run_ours(sampler, model, x, schedule, steps, **opts):
    seen = []
    sampler(model, x, schedule, steps=steps, callback=seen.append, **opts)
    return [s["t"] for s in seen], [s["x"] for s in seen]


# Tolerances: 1e-4 (rtol and atol) in float32, 1e-5 in float64. The residual (measured ≤ 2e-5 in the
# worst case, usually ~1e-6) comes from diffusers taking ᾱ's cumulative product in float32 (ours: float64,
# rounded once; they differ by ≤ 1e-6 relative) and doing DPM-Solver steps in float32.
TOL = {torch.float32: 1e-4, torch.float64: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps,eta", [(50, 0.0), (20, 0.5), (7, 1.0), (1, 0.0)])
def test_ddim_matches_diffusers(schedule, dtype, steps, eta):
    import diffusers  # test-only dependency (the "test" extra); required, never skipped
    scheduler = diffusers.DDIMScheduler(
        **LDM_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )
    model = toy_model(schedule)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref_t, ref_x = _run_diffusers(scheduler, model, x, steps, eta=eta, generator=torch.Generator().manual_seed(5))
    t, xs = _run_ours(sample_ddim, model, x, schedule, steps, eta=eta, generator=torch.Generator().manual_seed(5))
    assert t == ref_t
    assert len(xs) == len(ref_x) == steps
    for ours, ref in zip(xs, ref_x):
        torch.testing.assert_close(ours, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("steps", [1, 2, 3, 20, 50])
def test_dpmpp_2m_matches_diffusers(schedule, dtype, spacing, offset, steps):
    import diffusers  # test-only dependency (the "test" extra); required, never skipped
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **LDM_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
        timestep_spacing=spacing, steps_offset=offset,
    )
    model = toy_model(schedule)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref_t, ref_x = _run_diffusers(scheduler, model, x, steps)
    t, xs = _run_ours(sample_dpmpp_2m, model, x, schedule, steps, spacing=spacing, offset=offset)
    assert t == ref_t
    for ours, ref in zip(xs, ref_x):
        torch.testing.assert_close(ours, ref.to(dtype), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 7, 20, 50, 333, 999])
def test_grids_match_diffusers(spacing, steps):
    import diffusers  # test-only dependency (the "test" extra); required, never skipped
    scheduler = diffusers.DDIMScheduler(**LDM_SCHEDULE, steps_offset=1, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert spaced_timesteps(steps, 1000, spacing, offset=1) == scheduler.timesteps.tolist()


# -- grids -------------------------------------------------------------------------------------------
def test_leading_grid_is_ldm_uniform_discretization():
    # LDM make_ddim_timesteps("uniform"): range(0, T, T // S) + 1
    for steps in (10, 20, 50, 100, 200, 250, 500):
        assert spaced_timesteps(steps, 1000) == [t + 1 for t in range(0, 1000, 1000 // steps)][::-1]
    assert spaced_timesteps(50, 1000)[:3] == [981, 961, 941]


def test_default_grids(schedule):
    assert sampler_timesteps("ddpm", schedule, 1000) == list(range(999, -1, -1))  # LDM p_sample_loop
    assert sampler_timesteps("ddim", schedule, 50) == spaced_timesteps(50, 1000, "leading", 1)
    assert sampler_timesteps("plms", schedule, 50) == spaced_timesteps(50, 1000, "leading", 1)
    assert sampler_timesteps("dpmpp_2m", schedule, 20)[0] == 999


# -- the shared interface ----------------------------------------------------------------------------
def test_registry_and_unknown_name():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "dpmpp_2m"}
    assert get_sampler("ddim") is sample_ddim
    with pytest.raises(KeyError, match="allowed: ddpm, ddim, plms, dpmpp_2m"):
        get_sampler("euler")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_steps_validation(schedule, name):
    sampler = get_sampler(name)
    x = torch.zeros(1, D)
    for bad in (0, 1001, -3):
        with pytest.raises(ValueError, match=r"steps must be in 1\.\.1000"):
            sampler(lambda x, t: x, x, schedule, steps=bad)
    for bad in (2.5, True, "50"):
        with pytest.raises(TypeError, match="steps must be an integer"):
            sampler(lambda x, t: x, x, schedule, steps=bad)


def test_grid_errors_name_the_fix(schedule):
    with pytest.raises(ValueError, match="offset=0 or spacing='trailing'"):
        sample_ddim(lambda x, t: x, torch.zeros(1, D), schedule, steps=1000)  # leading + offset 1 → t = 1000
    with pytest.raises(ValueError, match="repeats timesteps"):
        sample_dpmpp_2m(lambda x, t: x, torch.zeros(1, D), schedule, steps=1000)
    with pytest.raises(ValueError, match="unknown spacing"):
        spaced_timesteps(10, 1000, "quad")


@pytest.mark.parametrize("name,nfe", [("ddpm", 6), ("ddim", 6), ("plms", 7), ("dpmpp_2m", 6)])
def test_nfe_callback_and_timestep_tensor(gaussian, schedule, name, nfe):
    infos, calls = [], []

    def denoise(x, t):
        calls.append(t)
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        assert int(t.min()) >= 0 and int(t.max()) < 1000
        return gaussian.eps(x, t)

    x = torch.randn(3, D, dtype=torch.float64)
    get_sampler(name)(denoise, x, schedule, steps=6, callback=infos.append)
    assert len(calls) == nfe and infos[-1]["nfe"] == nfe
    assert [i["i"] for i in infos] == list(range(6))
    assert set(infos[0]) == {"i", "t", "x", "denoised", "nfe"}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inference_mode_input_untouched_and_reproducible(gaussian, schedule, name):
    x = torch.randn(5, D, dtype=torch.float64)
    before = x.clone()
    with torch.inference_mode():
        a = get_sampler(name)(gaussian.eps, x, schedule, steps=5, generator=torch.Generator().manual_seed(1))
    b = get_sampler(name)(gaussian.eps, x, schedule, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, before)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype


def test_bad_denoiser_output_and_eta(schedule):
    with pytest.raises(ValueError, match="denoise returned shape"):
        sample_ddim(lambda x, t: x[:, :1], torch.zeros(2, D), schedule, steps=3)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(lambda x, t: x, torch.zeros(2, D), schedule, steps=3, eta=-1.0)
    with pytest.raises(TypeError):
        sample_plms(lambda x, t: x, torch.zeros(2, D), schedule, steps=3, eta=0.5)


def test_plms_single_step_evaluates_at_zero(gaussian, schedule):
    ts = []
    sample_plms(lambda x, t: (ts.append(int(t[0])), gaussian.eps(x, t))[1], torch.zeros(2, D, dtype=torch.float64),
                schedule, steps=1)
    assert ts == [1, 0]
