"""Prepacked sampling (``sample(..., prepack=True)``): the same network up to float rounding, on every
route, following weight and context changes, and never on a path autograd records; and how ldmkit
chooses the OpenMP wait policy."""

import pytest
import torch
from torch import nn

from ldmkit._threads import SPIN_COUNT, _cores, choose_wait_policy, other_running
from ldmkit.conditioning import StackConfig, UNetWiring
from ldmkit.config import UNetConfig
from ldmkit.models.prepack import Conv2d, GroupNorm, Linear, prepack_available
from ldmkit.models.unet import UNet
from toys import batch, make_stack

SMALL = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], num_heads=2)
# a PyTorch without oneDNN refuses prepack=True with a clear error (tested in test_ldm); every CPU wheel has it
needs_onednn = pytest.mark.skipif(prepack_available() is not None, reason=str(prepack_available()))


def randomized(unet: UNet) -> UNet:
    torch.manual_seed(0)
    with torch.no_grad():  # zero-initialized outputs would hide every difference
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return unet.eval()


def both(unet, *args, **kwargs):
    with torch.inference_mode():
        plain = unet(*args, **kwargs)
        with unet.prepacked():
            packed = unet(*args, **kwargs)
    return plain, packed


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


def test_state_dict_and_plain_path_are_those_of_torch_nn():
    assert issubclass(Conv2d, nn.Conv2d) and issubclass(Linear, nn.Linear) and issubclass(GroupNorm, nn.GroupNorm)
    conv = Conv2d(3, 4, 3, padding=1)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x, r = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    assert torch.equal(conv(x), ref(x)) and torch.equal(conv(x, add=r), r + ref(x))
    lin = Linear(6, 5)
    y, r = torch.randn(3, 6), torch.randn(3, 5)
    assert torch.equal(lin(y, add=r), r + nn.functional.linear(y, lin.weight, lin.bias))


@needs_onednn
@pytest.mark.parametrize("tokens", [1, 5])
def test_prepacked_unet_matches_the_plain_one_on_every_route(tokens):
    stack = make_stack(StackConfig(context_dim=8, vector_dim=12), map={"channels": 3}).eval()
    unet = randomized(UNet(SMALL, latent_channels=4, wiring=stack.wiring()))
    cond = stack(batch(3))
    ctx, mask = cond.context[:, :tokens], cond.context_mask[:, :tokens]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([3, 300, 900])
    plain, packed = both(unet, x, t, ctx, mask, cond.channels, cond.vector)
    assert packed.shape == plain.shape and packed.is_contiguous()
    assert close(plain, packed), (plain - packed).abs().max()
    # the prepacked output still depends on every input (nothing cached that should not be)
    for changed in (dict(context=ctx + 1.0), dict(channels=cond.channels + 1.0), dict(vector=cond.vector + 1.0)):
        kwargs = dict(context=ctx, context_mask=mask, channels=cond.channels, vector=cond.vector) | changed
        plain_changed, packed_changed = both(unet, x, t, **kwargs)
        assert close(plain_changed, packed_changed) and not close(packed_changed, packed, 1e-3), list(changed)


@needs_onednn
def test_prepacked_class_model_single_context_token_and_larger_batch():
    """The one-token path (a class label) skips the queries: softmax over one key is exactly 1."""
    unet = randomized(UNet(SMALL, latent_channels=3, wiring=UNetWiring(8, 1, 0, None)))
    x, t, ctx = torch.randn(9, 3, 8, 8), torch.randint(0, 1000, (9,)), torch.randn(9, 1, 8)
    plain, packed = both(unet, x, t, ctx)
    assert close(plain, packed)
    bigger = torch.randn(9, 3, 16, 8)  # another size after the first call: packs are not tied to a shape
    plain, packed = both(unet, bigger, t, ctx)
    assert close(plain, packed)


@needs_onednn
def test_packs_follow_weight_and_context_changes_and_autograd_takes_the_plain_path():
    unet = randomized(UNet(SMALL, latent_channels=3, wiring=UNetWiring(8, 4, 0, None)))
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([5, 500]), torch.randn(2, 4, 8)
    with unet.prepacked():
        with torch.inference_mode():
            before = unet(x, t, ctx)
            other_context = unet(x, t, ctx * 2)  # a new context tensor: its keys and values are computed anew
        with torch.no_grad():  # weights changed in place (an optimizer step, an EMA swap)
            for p in unet.parameters():
                p.mul_(1.1)
        with torch.inference_mode():
            after = unet(x, t, ctx)
        loss = unet(x, t, ctx).pow(2).mean()  # autograd records: the plain path, so gradients flow
        loss.backward()
    assert not close(before, other_context, 1e-3) and not close(before, after, 1e-3)
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    with torch.inference_mode():
        plain = unet(x, t, ctx)
    assert close(plain, after)
    assert all(m._packs is None for m in unet.modules() if hasattr(m, "_packs"))  # dropped on leaving


@needs_onednn
def test_prepacked_under_bf16_autocast_stays_close():
    unet = randomized(UNet(SMALL, latent_channels=3, wiring=UNetWiring(8, 4, 0, None)))
    x, t, ctx = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, 4, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = unet(x, t, ctx)
        with unet.prepacked():
            packed = unet(x, t, ctx)
    assert packed.dtype == plain.dtype == torch.float32
    assert (plain - packed).abs().mean() < 0.02 * plain.abs().mean()


def test_wait_policy_keeps_a_users_setting_and_reads_the_machine():
    def choose(env, running):
        return choose_wait_policy(env, running=running, torch_loaded=False)

    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert choose(env, 5) == "as set: OMP_WAIT_POLICY=ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "7"}
    assert choose(env, 0).startswith("as set") and "OMP_WAIT_POLICY" not in env
    env = {}
    assert choose(env, 0).startswith("short spin") and env["GOMP_SPINCOUNT"] == str(SPIN_COUNT)
    # a child process inherits ldmkit's choice with its mark, and decides again (its machine may be busy now)
    assert "other running" in choose(env, 1) and env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env
    env = {}
    assert "cannot read" in choose(env, None) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {}
    assert choose_wait_policy(env, running=0, torch_loaded=True).startswith("not applied") and env == {}
    # fewer threads than cores leave room for a neighbour; a thread count of 0 means all cores
    cores = _cores()
    assert choose({"OMP_NUM_THREADS": "1"}, cores - 1).startswith("short spin")
    assert choose({"OMP_NUM_THREADS": "1"}, cores).startswith("passive")
    assert choose({"OMP_NUM_THREADS": "0"}, 1).startswith("passive")
    found = other_running()
    assert found is None or found >= 0


@pytest.mark.parametrize("hw", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_small_3x3_convolution_as_one_matrix_product_is_the_convolution(hw, bias):
    """What compiled sampling does at the UNet's 2 x 2 level: the same sums, and its weights as buffers
    that are never saved; anything else (3 x 3 inputs, stride 2, 1x1 kernels) stays a convolution."""
    torch.manual_seed(0)
    conv = Conv2d(6, 5, 3, padding=1, bias=bias)
    x = torch.randn(4, 6, *hw)
    ref = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert conv._small_input(x)
    try:
        Conv2d.small_as_linear = True
        with torch.no_grad():
            out = conv(x)
            Conv2d.build_small = True
            built = conv(x)
            Conv2d.build_small = False
            again = conv(x)
    finally:
        Conv2d.small_as_linear = Conv2d.build_small = False
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(built, ref, atol=1e-5) and torch.equal(built, again)
    assert f"small_weight_{hw[0]}x{hw[1]}" in dict(conv.named_buffers())
    assert set(conv.state_dict()) == ({"weight", "bias"} if bias else {"weight"})
    assert not conv._small_input(torch.randn(1, 6, 3, 3)) and not conv._small_input(torch.randn(1, 6, 2, 3))
    assert not Conv2d(6, 5, 3, stride=2, padding=1)._small_input(x) and not Conv2d(6, 5, 1)._small_input(x)
    with torch.no_grad():
        assert torch.equal(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))  # flag off: plain
