"""The forward process: β schedules, q(x_t|x_0), parameterization conversions, training loss."""

import math

import pytest
import torch

from ldmkit.config import DiffusionConfig
from ldmkit.diffusion import NoiseSchedule, cosine_betas, scaled_linear_betas

PAIRS = [(a, b) for a in ("eps", "x0", "v") for b in ("eps", "x0", "v")]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config()


def test_defaults_are_ldm_scaled_linear(schedule):
    assert schedule.T == schedule.num_timesteps == 1000
    assert schedule.parameterization == "eps"
    assert schedule.alphas_cumprod.dtype == torch.float32 and schedule.betas.dtype == torch.float32
    assert schedule.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert schedule.betas[-1].item() == pytest.approx(0.0195, rel=1e-6)
    # β is linear on the square-root scale
    root = scaled_linear_betas(1000).sqrt()
    assert torch.allclose(root.diff(), root.diff()[0].expand(999), rtol=1e-9)
    # computed in float64, stored in float32
    expected = torch.cumprod(1 - scaled_linear_betas(1000), 0)
    assert torch.equal(schedule.alphas_cumprod, expected.float())
    assert torch.equal(schedule.alphas_cumprod_f64, expected.float().double())
    assert bool((schedule.alphas_cumprod.diff() < 0).all())


def test_cosine_schedule_follows_nichol_dhariwal():
    sched = NoiseSchedule.from_config(DiffusionConfig(schedule="cosine", parameterization="v"))
    assert sched.parameterization == "v"
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    analytic = f / f0
    # identical wherever β was not clipped (the last few steps clip at 0.999)
    unclipped = cosine_betas(1000) < 0.999
    assert unclipped[:990].all() and not unclipped[-1]
    assert torch.allclose(sched.alphas_cumprod_f64[unclipped], analytic[unclipped], rtol=1e-6, atol=1e-9)
    assert float(sched.betas.max()) <= 0.999 + 1e-7


def test_from_config_overrides_and_validation():
    sched = NoiseSchedule.from_config(DiffusionConfig(), timesteps=50, linear_end=0.012, parameterization="x0")
    assert sched.T == 50 and sched.parameterization == "x0"
    assert sched.betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    with pytest.raises(ValueError, match="parameterization"):
        NoiseSchedule([0.1, 0.2], parameterization="score")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule([0.1, 1.5])


def test_matches_diffusers_betas():
    import diffusers  # test-only dependency (the "test" extra); required, never skipped
    ddpm = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear"
    )
    mine = NoiseSchedule.from_config()
    # diffusers takes the cumulative product in float32; ours is float64 rounded once
    assert torch.allclose(mine.alphas_cumprod_f64, ddpm.alphas_cumprod.double(), rtol=1e-5, atol=0)
    cos = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    mine = NoiseSchedule.from_config(schedule="cosine")
    assert torch.allclose(mine.betas, cos.betas, rtol=1e-5, atol=1e-7)


def test_q_sample_formula_and_broadcast(schedule):
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, noise)
    for i in range(3):
        a = schedule.alphas_cumprod_f64[t[i]]
        assert torch.allclose(x_t[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i])
    # a scalar t applies to the whole batch
    assert torch.allclose(schedule.q_sample(x0, 500, noise)[1], x_t[1])


def test_q_sample_statistics(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 2.0)
    x_t = schedule.q_sample(x0, 300, torch.randn(x0.shape, generator=g))
    a = schedule.alphas_cumprod_f64[300].item()
    assert x_t.mean().item() == pytest.approx(2 * math.sqrt(a), abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.03)


@pytest.mark.parametrize("src,dst", PAIRS)
def test_conversions_are_consistent_with_the_forward_process(schedule, src, dst):
    x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 600, 999])
    x_t = schedule.q_sample(x0, t, eps)
    truth = {
        "eps": eps,
        "x0": x0,
        "v": schedule.target(x0, eps, t, "v"),
    }
    converted = schedule.convert(truth[src], x_t, t, src, dst)
    torch.testing.assert_close(converted, truth[dst], rtol=1e-7, atol=1e-7)
    shortcut = {"eps": schedule.to_eps, "x0": schedule.to_x0, "v": schedule.to_v}[dst]
    torch.testing.assert_close(shortcut(truth[src], x_t, t, src), truth[dst], rtol=1e-7, atol=1e-7)


def test_v_definition(schedule):
    x0, eps = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    t = torch.tensor([100, 900])
    a = schedule.alphas_cumprod_f64[t][:, None]
    assert torch.allclose(schedule.target(x0, eps, t, "v"), a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_bad_timesteps_are_rejected(schedule):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        schedule.q_sample(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        schedule.q_sample(x, -1)
    with pytest.raises(TypeError, match="integers"):
        schedule.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="unknown src"):
        schedule.convert(x, x, 0, "score", "eps")


def test_sample_timesteps(schedule):
    t1 = schedule.sample_timesteps(4096, torch.Generator().manual_seed(3))
    t2 = schedule.sample_timesteps(4096, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.long and t1.shape == (4096,)
    assert int(t1.min()) >= 0 and int(t1.max()) <= 999
    assert t1.float().mean().item() == pytest.approx(499.5, abs=15)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_training_loss_targets(kind):
    sched = NoiseSchedule.from_config(parameterization=kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = sched.sample_timesteps(5, g)
    seen = {}

    def oracle(x_t, tt, *, tag):
        seen["tag"] = tag
        assert torch.equal(tt, t)
        torch.testing.assert_close(x_t, sched.q_sample(x0, t, noise))
        return sched.target(x0, noise, t)

    assert sched.training_loss(oracle, x0, t, noise, tag="kw").item() == pytest.approx(0.0, abs=1e-12)
    assert seen["tag"] == "kw"  # model kwargs are forwarded
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    target = sched.target(x0, noise, t)
    per_sample = sched.training_loss(zero, x0, t, noise, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(per_sample, (target**2).flatten(1).mean(1))
    torch.testing.assert_close(sched.training_loss(zero, x0, t, noise), (target**2).mean())
    torch.testing.assert_close(sched.training_loss(zero, x0, t, noise, loss_type="l1"), target.abs().mean())


def test_training_loss_defaults_gradients_and_errors():
    sched = NoiseSchedule.from_config()
    w = torch.nn.Parameter(torch.tensor(0.5))
    model = lambda x_t, t: w * x_t  # noqa: E731
    x0 = torch.randn(3, 2, 4, 4)
    l1 = sched.training_loss(model, x0, generator=torch.Generator().manual_seed(1))
    l2 = sched.training_loss(model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(l1, l2) and l1.dim() == 0
    l1.backward()
    assert w.grad is not None and torch.isfinite(w.grad)
    with pytest.raises(ValueError, match="model output shape"):
        sched.training_loss(lambda x_t, t: x_t[:, :1], x0)
    with pytest.raises(ValueError, match="loss_type"):
        sched.training_loss(model, x0, loss_type="huber")
    with pytest.raises(ValueError, match="noise shape"):
        sched.training_loss(model, x0, noise=torch.randn(3))
