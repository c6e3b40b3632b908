"""Classifier-free guidance: the formulas against separate unbatched calls, one model call per step,
τθ computed once. Uses the toy stack (tokens ``words``, channels ``map``, vector ``level``)."""

import dataclasses

import pytest
import torch
from toys import batch, make_stack

from ldmkit.diffusion import GuidedDenoiser, NoiseSchedule, as_eps_denoiser, concat_stack_outputs, sample_ddim

B = 3
KEEP = {"words": True, "map": True, "level": True}


class ToyUNet:
    """A nonlinear function of every UNet input, recording each call's batch size."""

    def __init__(self, context_dim=128, vector_dim=128, channels=2):
        g = torch.Generator().manual_seed(0)
        self.wc = torch.randn(context_dim, 4, generator=g, dtype=torch.float64) / 10
        self.wv = torch.randn(vector_dim, 4, generator=g, dtype=torch.float64) / 10
        self.wm = torch.randn(4, channels, generator=g, dtype=torch.float64)
        self.batches = []

    def __call__(self, x, t, context=None, context_mask=None, channels=None, vector=None):
        self.batches.append(x.shape[0])
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        ctx = (context.double() * context_mask[..., None]).sum(1) @ self.wc  # (B, 4)
        vec = vector.double() @ self.wv
        ch = torch.einsum("oc,bchw->bohw", self.wm, channels.double())
        h = x + ctx[:, :, None, None] + vec[:, :, None, None] + 0.1 * ch + 0.001 * t.double()[:, None, None, None]
        return torch.tanh(h) * x.abs() + 0.3 * h


@pytest.fixture
def setup():
    torch.manual_seed(0)
    stack = make_stack()
    stack.eval()
    with torch.no_grad():
        outputs = stack.encode(batch(B))
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([10, 500, 999])
    return stack, outputs, x, t


def eps_for(unet, stack, parts, x, t):
    """One unbatched reference call with conditioning composed from ``parts`` (others null)."""
    with torch.no_grad():
        cond = stack.compose(parts if parts else stack.nulls(B), KEEP)
    return unet(x, t, **dataclasses.asdict(cond))


def test_joint_guidance_formula_in_one_call(setup):
    stack, outputs, x, t = setup
    unet = ToyUNet()
    guided = GuidedDenoiser(unet, stack, outputs, 7.5)
    out = guided(x, t)
    assert unet.batches == [2 * B] and guided.calls == 1 and guided.branches == ["uncond", "cond"]
    e_u = eps_for(unet, stack, {}, x, t)
    e_c = eps_for(unet, stack, outputs, x, t)
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u), rtol=1e-12, atol=1e-12)


def test_scale_one_is_conditional_only_and_scale_zero_unconditional(setup):
    stack, outputs, x, t = setup
    unet = ToyUNet()
    out = GuidedDenoiser(unet, stack, outputs, 1.0)(x, t)
    assert unet.batches == [B]  # the cheap path: no unconditional branch
    torch.testing.assert_close(out, eps_for(unet, stack, outputs, x, t), rtol=0, atol=0)
    unet.batches.clear()
    out = GuidedDenoiser(unet, stack, outputs, 0.0)(x, t)
    assert unet.batches == [B]
    torch.testing.assert_close(out, eps_for(unet, stack, {}, x, t), rtol=0, atol=0)


def test_per_conditioner_guidance_formula(setup):
    stack, outputs, x, t = setup
    unet = ToyUNet()
    scales = {"words": 3.0, "map": 1.5, "level": -0.5}
    guided = GuidedDenoiser(unet, stack, outputs, scales)
    out = guided(x, t)
    assert unet.batches == [4 * B] and guided.branches == ["uncond", "words", "map", "level"]
    e_u = eps_for(unet, stack, {}, x, t)
    expected = e_u.clone()
    for name, s in scales.items():
        expected += s * (eps_for(unet, stack, {name: outputs[name]}, x, t) - e_u)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_per_conditioner_scales_summing_to_one_skip_the_baseline_and_zero_drops(setup):
    stack, outputs, x, t = setup
    unet = ToyUNet()
    guided = GuidedDenoiser(unet, stack, outputs, {"words": 0.25, "map": 0.75, "level": 0.0})
    out = guided(x, t)
    assert unet.batches == [2 * B] and guided.branches == ["words", "map"] and not guided.has_baseline
    e_u = eps_for(unet, stack, {}, x, t)
    e_w = eps_for(unet, stack, {"words": outputs["words"]}, x, t)
    e_m = eps_for(unet, stack, {"map": outputs["map"]}, x, t)
    torch.testing.assert_close(out, e_u + 0.25 * (e_w - e_u) + 0.75 * (e_m - e_u), rtol=1e-12, atol=1e-12)


def test_negative_conditioning(setup):
    stack, outputs, x, t = setup
    with torch.no_grad():
        negative = stack.encode({"words": [[9], [8], [7, 6]]}, names=["words"])
    unet = ToyUNet()
    guided = GuidedDenoiser(unet, stack, outputs, 4.0, negative_outputs=negative)
    out = guided(x, t)
    assert guided.branches == ["negative", "cond"]
    e_n = eps_for(unet, stack, negative, x, t)
    e_c = eps_for(unet, stack, outputs, x, t)
    torch.testing.assert_close(out, e_n + 4.0 * (e_c - e_n), rtol=1e-12, atol=1e-12)
    # per-conditioner: each branch replaces one slot of the negative baseline
    out = GuidedDenoiser(unet, stack, outputs, {"words": 2.0, "level": 3.0, "map": 0.0}, negative_outputs=negative)(x, t)
    e_w = eps_for(unet, stack, {"words": outputs["words"]}, x, t)
    e_l = eps_for(unet, stack, {**negative, "level": outputs["level"]}, x, t)
    torch.testing.assert_close(out, e_n + 2.0 * (e_w - e_n) + 3.0 * (e_l - e_n), rtol=1e-12, atol=1e-12)


def test_always_keeps_a_conditioner_in_every_branch(setup):
    stack, outputs, x, t = setup
    unet = ToyUNet()
    out = GuidedDenoiser(unet, stack, outputs, {"words": 5.0, "level": 2.0}, always=["map"])(x, t)
    base = {"map": outputs["map"]}
    e_b = eps_for(unet, stack, base, x, t)
    e_w = eps_for(unet, stack, {**base, "words": outputs["words"]}, x, t)
    e_l = eps_for(unet, stack, {**base, "level": outputs["level"]}, x, t)
    torch.testing.assert_close(out, e_b + 5.0 * (e_w - e_b) + 2.0 * (e_l - e_b), rtol=1e-12, atol=1e-12)


def test_guidance_commutes_with_parameterization(setup):
    """Weights sum to 1, so guiding v-predictions then converting equals converting then guiding."""
    stack, outputs, x, t = setup
    schedule = NoiseSchedule.from_config(parameterization="v")
    unet = ToyUNet()
    guided_v = as_eps_denoiser(GuidedDenoiser(unet, stack, outputs, {"words": 3.0, "map": 2.0, "level": 1.0}), schedule)

    def eps_unet(x_t, tt, **cond):
        return schedule.to_eps(unet(x_t, tt, **cond), x_t, tt)  # tt: per-row timesteps of the repeated batch

    guided_eps = GuidedDenoiser(eps_unet, stack, outputs, {"words": 3.0, "map": 2.0, "level": 1.0})
    torch.testing.assert_close(guided_v(x, t), guided_eps(x, t), rtol=1e-10, atol=1e-10)


def test_one_model_call_per_step_and_no_conditioner_work_in_the_loop():
    torch.manual_seed(0)
    stack = make_stack()
    stack.eval()
    counts = {"encode": 0, "forward": 0, "proj": 0}
    original_encode = stack.encode

    def counting_encode(*args, **kwargs):
        counts["encode"] += 1
        return original_encode(*args, **kwargs)

    stack.encode = counting_encode
    for cond in stack.conditioners.values():
        cond.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    for proj in list(stack.token_proj.values()) + list(stack.vector_proj.values()):
        proj.register_forward_hook(lambda *a: counts.__setitem__("proj", counts["proj"] + 1))

    unet = ToyUNet()
    guided = GuidedDenoiser.from_batch(unet, stack, batch(B), {"words": 2.0, "map": 1.0, "level": 1.5})
    after_setup = dict(counts)
    assert after_setup["encode"] == 1 and after_setup["forward"] == 3  # τθ once per conditioner
    schedule = NoiseSchedule.from_config()
    x = torch.randn(B, 4, 8, 8, dtype=torch.float64)
    with torch.inference_mode():
        sample_ddim(as_eps_denoiser(guided, schedule), x, schedule, steps=12)
    assert guided.calls == 12 and unet.batches == [4 * B] * 12
    assert counts == after_setup  # no encode, no conditioner forward, no projection during sampling


def test_from_batch_with_negative_batch_and_training_mode_dropout_is_ignored():
    torch.manual_seed(0)
    stack = make_stack(words={"dropout": 1.0}, level={"dropout": 1.0})
    stack.train()  # compose would drop everything in training mode; guidance must keep what it asks for
    unet = ToyUNet()
    guided = GuidedDenoiser.from_batch(unet, stack, {"words": [[1], [2], [3]]}, 2.0,
                                       negative_batch={"words": [[4], [4], [4]]})
    with torch.no_grad():
        cond = stack.compose(stack.encode({"words": [[1], [2], [3]]}, names=["words"]), KEEP)
    torch.testing.assert_close(guided.conditioning.context[B:], cond.context)
    assert guided.conditioning.context.shape[0] == 2 * B


def test_concat_stack_outputs_and_errors(setup):
    stack, outputs, x, t = setup
    a = stack.compose(outputs, KEEP)
    both = concat_stack_outputs([a, a])
    assert both.context.shape[0] == 2 * B and both.vector.shape[0] == 2 * B and both.channels.shape[0] == 2 * B
    unet = ToyUNet()
    with pytest.raises(KeyError, match="this model has: words, map, level"):
        GuidedDenoiser(unet, stack, outputs, {"text": 2.0})
    with pytest.raises(ValueError, match="no scale"):
        GuidedDenoiser(unet, stack, outputs, {"words": 2.0})
    with pytest.raises(ValueError, match="finite"):
        GuidedDenoiser(unet, stack, outputs, float("nan"))
    with pytest.raises(ValueError, match="always"):
        GuidedDenoiser(unet, stack, outputs, {"words": 2.0, "level": 1.0, "map": 1.0}, always=["map"])
    with pytest.raises(ValueError, match="batch size"):
        GuidedDenoiser(unet, stack, outputs, 2.0)(x[:2], t[:2])
    with pytest.raises(ValueError, match="empty"):
        GuidedDenoiser(unet, stack, {}, 2.0)
