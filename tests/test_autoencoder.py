"""The first-stage model: config validation, shapes for every f, KL / VQ regularizers, scale factor, files."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ldmkit.models.autoencoder import (
    ALLOWED_DOWNSAMPLE_FACTORS,
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    VectorQuantizer,
    load_autoencoder,
    save_autoencoder,
)
from ldmkit.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldmkit.train.checkpoint import CheckpointError, read_metadata


def tiny(**kw) -> AutoencoderConfig:
    base = dict(ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4, resolution=16, z_channels=3, embed_dim=3)
    base.update(kw)
    return AutoencoderConfig(**base)


@pytest.mark.parametrize("f", ALLOWED_DOWNSAMPLE_FACTORS)
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_every_f_builds_and_round_trips_shapes(f: int, kind: str) -> None:
    levels = f.bit_length()  # f = 2 ** (levels - 1)
    cfg = tiny(kind=kind, ch_mult=[1] * levels, resolution=32, n_embed=16 if kind == "vq" else None)
    ae = Autoencoder(cfg).eval()
    assert ae.downsample_factor == f
    h = max(8, 2 * f)  # non-square images too: (h, 2h)
    x = torch.rand(2, 3, h, 2 * h) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert tuple(z.shape) == (2, 3, h // f, 2 * h // f) == (2, *ae.latent_shape(h, 2 * h))
        assert tuple(ae.decode(z).shape) == (2, 3, h, 2 * h)
        assert tuple(ae.reconstruct(x).shape) == (2, 3, h, 2 * h)


def test_config_rejects_bad_values_with_named_fields() -> None:
    with pytest.raises(ValidationError, match=r"f=2\^6=64.*allowed f: \[1, 2, 4, 8, 16, 32\]"):
        tiny(ch_mult=[1] * 7, resolution=64)
    with pytest.raises(ValidationError, match="n_embed"):
        tiny(kind="vq")
    with pytest.raises(ValidationError, match="n_embed is only used by kind='vq'"):
        tiny(n_embed=16)
    with pytest.raises(ValidationError, match="attn_resolutions"):
        tiny(attn_resolutions=[5])
    with pytest.raises(ValidationError, match="norm_groups=4 must divide"):
        tiny(ch=6)
    with pytest.raises(ValidationError, match="extra"):
        AutoencoderConfig(chanels=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="kind"):
        tiny(kind="gauss")
    with pytest.raises(ValidationError, match="scale_factor"):
        tiny(scale_factor=-1.0)


def test_divisibility_error_names_sizes_and_f() -> None:
    ae = Autoencoder(tiny(ch_mult=[1, 2, 2], resolution=16))
    with pytest.raises(ValueError, match=r"image size 30x32 .* f=4"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"33x32 .* f=4"):
        ae.latent_shape(33, 32)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(3, 32, 32))


def test_parameter_count_of_small_recipe_model() -> None:
    ae = Autoencoder(AutoencoderConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1))
    assert 0.5e6 < ae.num_parameters() < 3e6


def test_kl_posterior_clamps_logvar_and_kl_formula() -> None:
    mean = torch.randn(2, 3, 4, 4)
    logvar = torch.full((2, 3, 4, 4), 100.0)
    logvar[0] = -100.0
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert post.logvar.max() == 20.0 and post.logvar.min() == -30.0
    assert torch.equal(post.mode(), mean)
    # KL of N(mu, 1) to N(0, 1) is 0.5 * sum(mu^2)
    unit = DiagonalGaussian(torch.cat([mean, torch.zeros_like(mean)], 1))
    assert torch.allclose(unit.kl(), 0.5 * mean.pow(2).sum(dim=(1, 2, 3)))
    g = torch.Generator().manual_seed(0)
    s = unit.sample(g)
    assert s.shape == mean.shape and not torch.equal(s, mean)


def test_kl_forward_samples_and_encode_is_deterministic() -> None:
    ae = Autoencoder(tiny())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x)
    assert out.posterior is not None and out.reg_loss.ndim == 0 and out.reconstruction.shape == x.shape
    assert torch.equal(ae.encode(x), ae.encode(x))
    assert not torch.equal(ae.encode(x, sample=True), ae.encode(x))


def test_vq_straight_through_gradients_reach_the_encoder() -> None:
    ae = Autoencoder(tiny(kind="vq", n_embed=8))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = ae(x)
    (out.reconstruction.pow(2).mean() + out.reg_loss).backward()
    assert ae.encoder.conv_in.weight.grad is not None and ae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert ae.quantize is not None and ae.quantize.embedding.weight.grad is not None
    assert "perplexity" in out.stats and 1.0 <= out.stats["perplexity"] <= 8.0


def test_vq_straight_through_value_and_losses() -> None:
    vq = VectorQuantizer(4, 2, beta=0.25, usage_decay=0.9, dead_code_threshold=0.1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [5.0, 5.0]]))
    z = torch.tensor([[0.1, 0.9], [0.2, -0.9]]).reshape(1, 2, 1, 2).requires_grad_(True)  # vectors (0.1,0.2), (0.9,-0.9)
    out = vq(z)
    assert out.indices.tolist() == [[[0, 0]]]
    assert torch.allclose(out.z_q, torch.zeros_like(out.z_q))  # forward value = code
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity gradient
    expected = 1.25 * z.detach().pow(2).mean()
    assert torch.allclose(out.loss, expected)


def test_vq_dead_codes_are_restarted_from_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, beta=0.25, usage_decay=0.5, dead_code_threshold=0.5).train()
    with torch.no_grad():
        vq.embedding.weight.zero_()
        vq.embedding.weight[0] = torch.tensor([3.0, 3.0, 3.0])
    z = torch.randn(4, 3, 4, 4) * 0.1 + 3.0  # all nearest to code 0
    for _ in range(5):
        vq(z)
    assert vq.usage[0] > 0.9 and (vq.usage[1:] < 0.5 / 8).all()
    before = vq.usage_fraction()
    n = vq.restart_dead_codes()
    assert n == 7
    pool = z.permute(0, 2, 3, 1).reshape(-1, 3)
    for code in vq.embedding.weight[1:]:
        assert (pool == code).all(1).any(), "restarted codes are copies of encoder outputs"
    assert vq.usage_fraction() > before
    assert VectorQuantizer(8, 3, 0.25, 0.5, dead_code_threshold=0.0).restart_dead_codes() == 0


def test_vq_encode_is_pre_quantization_and_decode_quantizes() -> None:
    ae = Autoencoder(tiny(kind="vq", n_embed=8, scale_factor=1.0)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        zq = ae.encode(x, quantize=True)
        assert not torch.equal(z, zq)
        codes = ae.quantize.embedding.weight  # type: ignore[union-attr]
        assert all((codes == v).all(1).any() for v in zq.permute(0, 2, 3, 1).reshape(-1, 3))
        assert torch.allclose(ae.decode(z), ae.decode(zq))


def test_scale_factor_from_std_and_fixed() -> None:
    ae = Autoencoder(tiny()).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = ae.encode(x, scaled=False)
        s = ae.set_scale_from_std(raw)
        assert s == pytest.approx(1 / raw.std().item(), rel=1e-5)
        z = ae.encode(x)
        assert z.std().item() == pytest.approx(1.0, rel=1e-4)
        assert torch.allclose(ae.decode(z), ae.decode(raw, scaled=False), atol=1e-5)
    fixed = Autoencoder(tiny(scale_factor=0.18215))
    assert float(fixed.scale_factor) == pytest.approx(0.18215)
    assert "scale_factor" in dict(fixed.named_buffers())


def test_norm_none_builds_without_groupnorm() -> None:
    ae = Autoencoder(tiny(norm="none", ch=6))  # norm_groups need not divide the channels then
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in ae.modules())
    assert tuple(ae(torch.zeros(1, 3, 16, 16)).reconstruction.shape) == (1, 3, 16, 16)


def test_freeze_keeps_eval_mode_and_no_grads() -> None:
    ae = Autoencoder(tiny(dropout=0.1)).freeze()
    parent = torch.nn.Sequential(ae)
    parent.train()
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())


def test_mid_attention_and_attn_resolutions_build() -> None:
    ae = Autoencoder(tiny(attn_resolutions=[8], mid_attention=True))
    assert len(ae.encoder.down[1].attn) == 1 and len(ae.decoder.up[1].attn) == 2
    no_mid = Autoencoder(tiny(mid_attention=False))
    assert isinstance(no_mid.encoder.mid.attn_1, torch.nn.Identity)
    names = set(ae.state_dict())
    assert {"encoder.down.0.downsample.conv.weight", "decoder.up.1.upsample.conv.weight",
            "encoder.mid.attn_1.q.weight", "quant_conv.weight", "post_quant_conv.weight"} <= names


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_and_load_autoencoder(tmp_path, dtype: str) -> None:
    ae = Autoencoder(tiny(kind="vq", n_embed=8)).eval()
    ae.set_scale_from_std(torch.tensor([0.0, 2.0]))
    path = save_autoencoder(ae, tmp_path / "ae.safetensors", dtype=dtype)  # type: ignore[arg-type]
    meta = read_metadata(path)
    assert meta["ldmkit.kind"] == "autoencoder" and AutoencoderConfig.model_validate_json(meta["ldmkit.config"]) == ae.config
    back = load_autoencoder(path)
    assert float(back.scale_factor) == float(ae.scale_factor)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tol = 0 if dtype == "float32" else 5e-2
        assert torch.allclose(back.reconstruct(x), ae.reconstruct(x), atol=tol)


def test_load_autoencoder_rejects_other_files(tmp_path) -> None:
    from ldmkit.train.checkpoint import save_checkpoint

    p = save_checkpoint(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"ldmkit.kind": "unet"})
    with pytest.raises(CheckpointError, match="not an autoencoder file"):
        load_autoencoder(p)
    bad = save_checkpoint(tmp_path / "y.safetensors", {"a": torch.zeros(1)},
                          {"ldmkit.kind": "autoencoder", "ldmkit.config": '{"kind": "gauss"}'})
    with pytest.raises(CheckpointError, match="invalid autoencoder config"):
        load_autoencoder(bad)


def test_patchgan_discriminator_shapes() -> None:
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2))
    assert tuple(d(torch.zeros(2, 3, 32, 32)).shape) == (2, 1, 6, 6)
    d3 = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=3, norm="group"))
    assert tuple(d3(torch.zeros(1, 3, 64, 64)).shape) == (1, 1, 6, 6)
