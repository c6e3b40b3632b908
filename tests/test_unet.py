"""The UNet consumes the stack's three routes and is sized from the stack's wiring."""

import pytest
import torch

from ldmkit.conditioning import StackConfig
from ldmkit.config import UNetConfig
from ldmkit.models.unet import UNet
from toys import batch, make_stack

SMALL = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2)


def wired_unet():
    stack = make_stack(StackConfig(context_dim=8, vector_dim=12), map={"channels": 3}).eval()
    unet = UNet(SMALL, latent_channels=4, wiring=stack.wiring())
    return stack, unet


def randomize(unet):
    torch.manual_seed(0)
    with torch.no_grad():  # zero-initialized outputs would hide every dependency
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return unet


def test_sized_from_wiring_and_runs_every_route():
    stack, unet = wired_unet()
    assert unet.in_channels == 7 and unet.conv_in.in_channels == 7
    assert unet.vector_embed.in_features == 12
    cond = stack(batch(2))
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), cond.context, cond.context_mask, cond.channels, cond.vector)
    assert out.shape == (2, 4, 8, 8)


def test_output_depends_on_each_route_and_padding_is_ignored():
    stack, unet = wired_unet()
    unet = randomize(unet).eval()
    cond = stack(batch(2))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    base = unet(x, t, cond.context, cond.context_mask, cond.channels, cond.vector)
    for field in ("context", "channels", "vector"):
        kwargs = dict(context=cond.context, context_mask=cond.context_mask, channels=cond.channels, vector=cond.vector)
        kwargs[field] = kwargs[field] + 1.0
        assert not torch.allclose(unet(x, t, **kwargs), base, atol=1e-4), field
    # changing a padded (masked-out) token changes nothing
    ctx = cond.context.clone()
    assert not cond.context_mask[1, 1]
    ctx[1, 1] += 5.0
    same = unet(x, t, ctx, cond.context_mask, cond.channels, cond.vector)
    assert torch.allclose(same, base, atol=1e-5)


def test_samples_are_independent_in_a_batch():
    stack, unet = wired_unet()
    unet = randomize(unet).eval()
    cond = stack(batch(3))
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 50, 500])
    full = unet(x, t, cond.context, cond.context_mask, cond.channels, cond.vector)
    one = unet(x[1:2], t[1:2], cond.context[1:2], cond.context_mask[1:2], cond.channels[1:2], cond.vector[1:2])
    assert torch.allclose(full[1:2], one, atol=1e-5)


def test_unconditional_unet_and_larger_latents():
    unet = UNet(SMALL, latent_channels=3)
    assert unet(torch.randn(1, 3, 16, 16), torch.tensor([3])).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of 2"):
        unet(torch.randn(1, 3, 9, 9), torch.tensor([3]))


def test_missing_routes_are_clear_errors():
    stack, unet = wired_unet()
    cond = stack(batch(1))
    with pytest.raises(ValueError, match="vector=None"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), cond.context, cond.context_mask, cond.channels, None)
    with pytest.raises(ValueError, match="channels=None"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), cond.context, cond.context_mask, None, cond.vector)
    with pytest.raises(ValueError, match="context=None"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), None, None, cond.channels, cond.vector)


def test_gradients_reach_the_stack():
    stack, unet = wired_unet()
    stack.train()
    cond = stack.compose(stack.encode(batch(2)), keep={})
    loss = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), cond.context, cond.context_mask, cond.channels, cond.vector).pow(2).mean()
    randomize(unet)
    cond = stack.compose(stack.encode(batch(2)), keep={})
    loss = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), cond.context, cond.context_mask, cond.channels, cond.vector).pow(2).mean()
    loss.backward()
    assert stack.conditioners["words"].emb.weight.grad is not None
    assert stack.vector_proj["level"].weight.grad.abs().sum() > 0
