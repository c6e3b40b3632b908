"""The lowres plugin: both conditioners through the conformance kit, bad inputs, noise levels, 2x size."""

import numpy as np
import pytest
import torch

from ldmkit import ConditionerContext, ConditionInputError, ConditioningStack
from ldmkit.testing import conformance_tests
from ldmkit_lowres import LOWRES_SPEC, NOISE_LEVEL_SPEC, EXAMPLES, LowresConfig, NoiseLevelConfig

CONTEXT = ConditionerContext(image_size=32, latent_size=8, latent_channels=3)
IMG = EXAMPLES[0]

BAD_ANY_SIZE = [
    None,
    "small.png",                                          # a string is not an image
    np.zeros((8, 8), np.uint8),                           # greyscale: wrong channel count
    np.zeros((8, 8, 4), np.uint8),                        # RGBA
    np.zeros((3, 8, 8), np.uint8),                        # channels first
    np.full((8, 8, 3), 0.5),                              # floats
    np.full((8, 8, 3), np.nan),                           # NaN
    np.full((8, 8, 3), 300, np.int64),                    # outside 0..255
    np.zeros((8, 8, 3), bool),                            # bool
    {"image": IMG, "noise_level": 0.5},                   # above max_noise_level (0.2)
    {"image": IMG, "noise_level": -0.1},
    {"image": IMG, "noise_level": float("nan")},
    {"image": IMG, "noise_level": True},
    {"image": IMG, "noise_level": "low"},
    {"noise_level": 0.1},                                 # no image
    {"image": IMG, "sigma": 0.1},                         # unknown key
]
BAD = BAD_ANY_SIZE + [np.zeros((16, 16, 3), np.uint8), {"image": np.zeros((4, 4, 3), np.uint8)}]  # wrong size

TestLowresConformance = conformance_tests(LOWRES_SPEC, config={"channels": 8}, invalid_inputs=BAD, context=CONTEXT)
TestNoiseLevelConformance = conformance_tests(NOISE_LEVEL_SPEC, invalid_inputs=BAD_ANY_SIZE, context=CONTEXT)


def build(spec=LOWRES_SPEC, **config):
    torch.manual_seed(0)
    return spec.build(spec.config_cls(**config), CONTEXT).eval()


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_bad_input_names_field_and_sample(bad):
    c = build()
    with pytest.raises(ConditionInputError) as info:
        c.encode([IMG, bad])
    assert info.value.field == "lowres" and info.value.index == 1


def test_messages_are_specific():
    c = build()
    with pytest.raises(ConditionInputError, match=r"16 x 16, but the model takes 8 x 8"):
        c.encode([np.zeros((16, 16, 3), np.uint8)])
    with pytest.raises(ConditionInputError, match=r"RGBA"):
        c.encode([np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ConditionInputError, match=r"noise_level 0.5 is outside \[0, 0.2\]"):
        c.encode([{"image": IMG, "noise_level": 0.5}])
    with pytest.raises(ConditionInputError, match=r"NaN"):
        c.encode([np.full((8, 8, 3), np.nan)])


def test_config_levels():
    with pytest.raises(ValueError, match="sample_noise_level"):
        LowresConfig(max_noise_level=0.1, sample_noise_level=0.2)
    NoiseLevelConfig(max_noise_level=0.1, sample_noise_level=0.1)


def test_lists_and_tensors_give_the_same_output():
    c = build()
    ref = c.encode([IMG]).value
    for same in (IMG.tolist(), torch.from_numpy(IMG), IMG.astype(np.int64), {"image": IMG}):
        assert torch.equal(c.encode([same]).value, ref)


def test_eval_uses_sample_noise_level():
    lo, nl = build(), build(NOISE_LEVEL_SPEC)
    assert lo.prepare([IMG])["level"].tolist() == [0.0] and nl.prepare([IMG]).tolist() == [0.0]
    lo5, nl5 = build(sample_noise_level=0.05), build(NOISE_LEVEL_SPEC, sample_noise_level=0.05)
    assert lo5.prepare([IMG])["level"].tolist() == pytest.approx([0.05])
    assert nl5.prepare([IMG]).tolist() == pytest.approx([0.05])
    # a level in the value wins over the default
    assert lo.prepare([{"image": IMG, "noise_level": 0.15}])["level"].tolist() == pytest.approx([0.15])


def test_noise_is_additive_gaussian_at_the_level():
    c = build()
    p = c.prepare([{"image": IMG, "noise_level": 0.2}])
    noise = p["noise"]
    assert noise.shape == (1, 3, 8, 8) and abs(float(noise.std()) - 1) < 0.3
    clean = c(c.prepare([IMG])).value
    noisy = c(p).value
    manual = c({"image": p["image"] + 0.2 * noise, "noise": torch.zeros_like(noise), "level": torch.zeros(1)}).value
    assert torch.allclose(noisy, manual, atol=1e-6) and not torch.allclose(noisy, clean)


def test_training_levels_agree_between_the_two_conditioners_and_vary_per_step():
    lo, nl = build().train(), build(NOISE_LEVEL_SPEC).train()
    images = [EXAMPLES[0], EXAMPLES[1]["image"], EXAMPLES[2]["image"]] * 4
    torch.manual_seed(7)
    a = lo.prepare(images)["level"]
    b = nl.prepare(images)
    assert torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 0.2 and len(set(a.tolist()[:3])) == 3
    torch.manual_seed(7)
    assert torch.equal(lo.prepare(images)["level"], a)  # same step seed: same draw (exact resume)
    torch.manual_seed(8)
    assert not torch.equal(lo.prepare(images)["level"], a)  # the next step: fresh levels


def test_null_shapes():
    lo, nl = build(channels=6), build(NOISE_LEVEL_SPEC, dim=32)
    assert lo.null(2).value.shape == (2, 6, 8, 8)
    assert nl.null(2).value.shape == (2, 32)


def test_twice_the_size():
    lo, nl = build(), build(NOISE_LEVEL_SPEC)
    stack = ConditioningStack([lo, nl])
    big = np.random.default_rng(3).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    with stack.at_latent_size(16, 16):
        assert lo.lowres_size == (16, 16)
        outputs = stack.encode({"lowres": [big, big]})
        assert outputs["lowres"].value.shape == (2, 8, 16, 16)
        assert outputs["noise_level"].value.shape == (2, 128)
        assert lo.null(2).value.shape == (2, 8, 16, 16)
        assert stack.compose(outputs).channels.shape == (2, 8, 16, 16)
        with pytest.raises(ConditionInputError, match=r"8 x 8, but the model takes 16 x 16"):
            lo.encode([IMG])


def test_resizing_when_lowres_differs_from_latent_size():
    # f = 8 with lowres_factor 4: the low-res image is twice the latent size (area-downsampled);
    # lowres_factor 8 with f = 4: half the latent size (bicubic-upsampled)
    for image_size, latent, factor, side in ((64, 8, 4, 16), (32, 8, 8, 4)):
        ctx = ConditionerContext(image_size=image_size, latent_size=latent, latent_channels=4)
        c = LOWRES_SPEC.build(LowresConfig(lowres_factor=factor), ctx)
        assert c.encode([np.zeros((side, side, 3), np.uint8)]).value.shape == (1, 8, latent, latent)


def test_shapes_world_lowres_is_accepted():
    from ldmkit.data.shapes import ShapesWorld

    c = build()
    out = c.encode([ShapesWorld("train")[i].lowres for i in range(3)])
    assert out.value.shape == (3, 8, 8, 8)
