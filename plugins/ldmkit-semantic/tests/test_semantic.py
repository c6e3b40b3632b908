"""The semantic plugin: the conformance kit, bad inputs, and working at 2x the training size."""

import numpy as np
import pytest
import torch

from ldmkit import ConditionerContext, ConditionInputError, ConditioningStack
from ldmkit.testing import conformance_tests
from ldmkit_semantic import SPEC, SemanticConfig

CONTEXT = ConditionerContext(image_size=32, latent_size=8, latent_channels=3)
GOOD = SPEC.example_inputs[0]

BAD = [
    None,                                            # not a map
    "segmentation.png",                              # a string is not a map
    np.zeros((16, 16), np.int64),                    # wrong size (the model works at 32 x 32)
    np.zeros((32, 32, 3), np.uint8),                 # an RGB image, not class ids
    np.full((32, 32), 19, np.int64),                 # out of range (0..18)
    np.full((32, 32), -1, np.int64),                 # negative
    np.full((32, 32), 0.5),                          # not integers
    np.full((32, 32), np.nan),                       # NaN
    np.zeros((32, 32), bool),                        # bool
    [[0, 1], [2]],                                   # ragged lists
    np.zeros(32, np.int64),                          # 1-D
]

TestSemanticConformance = conformance_tests(SPEC, config={"channels": 8}, invalid_inputs=BAD, context=CONTEXT)


def build(**config):
    torch.manual_seed(0)
    return SPEC.build(SemanticConfig(**config), CONTEXT).eval()


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_bad_input_names_field_and_sample(bad):
    c = build()
    with pytest.raises(ConditionInputError) as info:
        c.encode([GOOD, bad])
    assert info.value.field == "segmentation" and info.value.index == 1


def test_messages_are_specific():
    c = build()
    with pytest.raises(ConditionInputError, match=r"class id 19 is out of range.*0\.\.18"):
        c.encode([np.full((32, 32), 19)])
    with pytest.raises(ConditionInputError, match=r"16 x 16, but the model works at 32 x 32"):
        c.encode([np.zeros((16, 16), np.int64)])
    with pytest.raises(ConditionInputError, match=r"NaN"):
        c.encode([[[0.0, float("nan")]] * 32])
    with pytest.raises(ConditionInputError, match=r"must be integers, got dtype float"):
        c.encode([np.zeros((32, 32), np.float32)])
    with pytest.raises(ConditionInputError, match=r"RGB image\?"):
        c.encode([np.zeros((32, 32, 3), np.uint8)])


def test_lists_tensors_and_uint8_give_the_same_output():
    c = build()
    ref = c.encode([GOOD]).value
    for same in (GOOD.tolist(), torch.from_numpy(GOOD), GOOD.astype(np.uint8), GOOD.astype(np.int32)):
        assert torch.equal(c.encode([same]).value, ref)


def test_output_and_null_at_latent_size():
    c = build(channels=5)
    out = c.encode([GOOD, GOOD])
    assert out.value.shape == (2, 5, 8, 8)
    assert c.null(3).value.shape == (3, 5, 8, 8)


def test_twice_the_size():
    c = build()
    stack = ConditioningStack([c])
    big = np.kron(GOOD, np.ones((2, 2), np.int64))  # 64 x 64
    with stack.at_latent_size(16, 16):
        assert c.map_size == (64, 64)
        out = c.encode([big])
        assert out.value.shape == (1, 8, 16, 16)
        assert c.null(2).value.shape == (2, 8, 16, 16)
        composed = stack.compose({"semantic": out})
        assert composed.channels.shape == (1, 8, 16, 16)
        with pytest.raises(ConditionInputError, match=r"32 x 32, but the model works at 64 x 64"):
            c.encode([GOOD])
    assert c.latent_hw == (8, 8) and c.encode([GOOD]).value.shape == (1, 8, 8, 8)


def test_output_is_local():
    """The encoder is convolutional: a change in one corner of the map leaves the far corner alone."""
    c = build()
    a = np.zeros((32, 32), np.int64)
    b = a.copy()
    b[:4, :4] = 7
    oa, ob = c.encode([a]).value, c.encode([b]).value
    assert not torch.allclose(oa[..., 0, 0], ob[..., 0, 0])
    assert torch.equal(oa[..., 4:, 4:], ob[..., 4:, 4:])


def test_other_downsampling_factors():
    for f in (1, 2, 8):
        ctx = ConditionerContext(image_size=8 * f, latent_size=8, latent_channels=4)
        c = SPEC.build(SemanticConfig(num_classes=3), ctx)
        assert c.encode([np.zeros((8 * f, 8 * f), np.int64)]).value.shape == (1, 8, 8, 8)


def test_shapes_world_maps_are_accepted():
    from ldmkit.data.shapes import ShapesWorld  # the test (not the plugin) may use the core's data

    c = build()
    scenes = ShapesWorld("train")
    out = c.encode([scenes[i].segmentation for i in range(4)])
    assert out.value.shape == (4, 8, 8, 8)
