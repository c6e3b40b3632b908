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


def test_position_code_is_a_function_of_the_normalized_position():
    from ldmkit.models.attention import position_code

    code = position_code(8, 8, 64)
    assert code.shape == (64, 64) and code.abs().max() <= 1
    assert torch.cdist(code, code).add(torch.eye(64) * 1e3).min() > 0.1  # every cell has its own code
    # the same point of the image gets the same code at any grid size: the centre of 1x1 and of 3x3
    assert torch.allclose(position_code(1, 1, 32)[0], position_code(3, 3, 32)[4], atol=1e-6)
    # the lowest-frequency x sine (1/4 cycle per image) is monotone in x and constant in y: "left of" is a comparison
    grid = position_code(4, 4, 32)[:, 0].view(4, 4)
    assert (grid.diff(dim=1) > 0).all() and torch.allclose(grid, grid[:1].expand(4, 4))
    assert position_code(2, 2, 6)[:, 4:].abs().max() == 0  # channels beyond 4 * (dim // 4) are zero


def test_position_embedding_tells_attention_where_a_token_is():
    from ldmkit.models.attention import SpatialTransformer

    outs = {}
    for kind in ("none", "sincos"):
        torch.manual_seed(0)
        st = SpatialTransformer(16, 2, None, position_embedding=kind)
        with torch.no_grad():
            for p in st.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        flat = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 4)  # the same feature at every position
        outs[kind] = st.eval()(flat)
    spread = {k: (v - v.mean(dim=(2, 3), keepdim=True)).abs().max().item() for k, v in outs.items()}
    assert spread["none"] < 1e-5  # without it, attention cannot tell positions apart
    assert spread["sincos"] > 1e-2


def test_position_embedding_adds_no_weights_and_trains_after_sampling():
    cfg = SMALL.model_copy(update={"position_embedding": "sincos"})
    plain, coded = UNet(SMALL, latent_channels=4), UNet(cfg, latent_channels=4)
    assert plain.state_dict().keys() == coded.state_dict().keys()  # checkpoints load either way
    coded.load_state_dict(randomize(plain).state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 500])
    with torch.inference_mode():  # the cached code is made here ...
        differ = (coded(x, t) - plain(x, t)).abs().max()
    assert differ > 1e-4
    coded(x, t).pow(2).mean().backward()  # ... and is usable by autograd afterwards
    assert coded.down[1][0].attn.proj_in.weight.grad is not None


def test_position_embedding_value_is_validated():
    with pytest.raises(ValueError, match="position_embedding"):
        UNetConfig(position_embedding="learned")
