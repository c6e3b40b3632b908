"""The inpaint plugin: the conformance kit, its field, bad inputs, 2x size and the known-region helpers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmkit import ConditionerContext, ConditionInputError, ConditioningStack
from ldmkit.testing import conformance_tests
from ldmkit_inpaint import INPAINT, SPEC, InpaintConfig, inpaint_value


def fake_first_stage(x: torch.Tensor) -> torch.Tensor:
    """A tiny deterministic "encoder": 4x4 average pooling (f = 4, 3 latent channels), doubled."""
    return 2.0 * F.avg_pool2d(x, 4)


CONTEXT = ConditionerContext(image_size=32, latent_size=8, latent_channels=3, encode_image=fake_first_stage)
GOOD = SPEC.example_inputs[0]
IMAGE, MASK = GOOD["image"], GOOD["mask"]

BAD = [
    None,
    IMAGE,                                                         # an image alone, not {image, mask}
    {"image": IMAGE},                                              # no mask
    {"image": IMAGE, "mask": MASK, "extra": 1},                    # unknown key
    {"image": IMAGE, "mask": MASK.astype(np.uint8) * 255},         # mask not binary
    {"image": IMAGE, "mask": np.full((32, 32), 0.5)},              # mask not binary
    {"image": IMAGE, "mask": np.full((32, 32), np.nan)},           # NaN
    {"image": IMAGE, "mask": MASK[:16, :16]},                      # mask/image size mismatch
    {"image": IMAGE, "mask": np.stack([MASK] * 3, -1)},            # mask with channels
    {"image": IMAGE[..., :2], "mask": MASK},                       # wrong channel count
    {"image": np.concatenate([IMAGE, IMAGE[..., :1]], -1), "mask": MASK},  # RGBA
    {"image": IMAGE / 255.0, "mask": MASK},                        # float image
    {"image": IMAGE.astype(np.int64) + 200, "mask": MASK},         # outside 0..255
    {"image": IMAGE[:16, :16], "mask": MASK[:16, :16]},            # wrong size for the model
    {"image": [[1, 2], [3]], "mask": MASK},                        # ragged lists
    {"image": "/no/such/file.png", "mask": MASK},                  # missing file
    {"image": IMAGE, "mask": np.array([["a"] * 32] * 32)},         # strings
]

TestInpaintConformance = conformance_tests(SPEC, invalid_inputs=BAD, context=CONTEXT)


def build(context=CONTEXT):
    return SPEC.build(InpaintConfig(), context).eval()


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_bad_input_names_field_and_sample(bad):
    with pytest.raises(ConditionInputError) as info:
        build().encode([GOOD, bad])
    assert info.value.field == "inpaint" and info.value.index == 1


def test_messages_are_specific():
    c = build()
    with pytest.raises(ConditionInputError, match=r"mask is not binary \(found 255\)"):
        c.encode([{"image": IMAGE, "mask": MASK.astype(np.uint8) * 255}])
    with pytest.raises(ConditionInputError, match=r"mask is 16 x 16 but the image is 32 x 32"):
        c.encode([{"image": IMAGE, "mask": MASK[:16, :16]}])
    with pytest.raises(ConditionInputError, match=r"16 x 16, but the model works at 32 x 32"):
        c.encode([{"image": IMAGE[:16, :16], "mask": MASK[:16, :16]}])
    with pytest.raises(ConditionInputError, match=r"missing mask"):
        c.encode([{"image": IMAGE}])


def test_output_is_masked_latents_and_mask():
    c = build()
    out = c.encode([GOOD]).value
    assert out.shape == (1, 4, 8, 8)
    x = torch.from_numpy(IMAGE).permute(2, 0, 1)[None].float() / 127.5 - 1
    m = torch.from_numpy(MASK)[None, None].float()
    assert torch.allclose(out[:, :3], fake_first_stage(x * (1 - m)), atol=1e-6)
    assert torch.allclose(out[:, 3:], F.avg_pool2d(m, 4))
    # the pixels under the mask do not matter
    other = IMAGE.copy()
    other[MASK] = 0
    assert torch.equal(c.encode([{"image": other, "mask": MASK}]).value, out)


def test_lists_tensors_ints_and_files_give_the_same_output(tmp_path):
    from PIL import Image

    c = build()
    ref = c.encode([GOOD]).value
    Image.fromarray(IMAGE).save(tmp_path / "image.png")
    Image.fromarray(MASK.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    as_json = json.loads(json.dumps({"image": IMAGE.tolist(), "mask": MASK.tolist()}))
    for same in (as_json, {"image": torch.from_numpy(IMAGE), "mask": torch.from_numpy(MASK)},
                 {"image": IMAGE, "mask": MASK.astype(np.int64)}, {"image": IMAGE, "mask": MASK.astype(np.float32)},
                 {"image": str(tmp_path / "image.png"), "mask": str(tmp_path / "mask.png")}):
        assert torch.equal(c.encode([same]).value, ref)


def test_null_is_zeros_and_all_unknown():
    null = build().null(2).value
    assert null.shape == (2, 4, 8, 8)
    assert null[:, :3].abs().sum() == 0 and (null[:, 3] == 1).all()


def test_twice_the_size():
    c = build()
    stack = ConditioningStack([c])
    big = {"image": np.kron(IMAGE, np.ones((2, 2, 1), np.uint8)), "mask": np.kron(MASK, np.ones((2, 2), bool))}
    with stack.at_latent_size(16, 16):
        assert c.image_size == (64, 64)
        out = c.encode([big])
        assert out.value.shape == (1, 4, 16, 16)
        assert c.null(2).value.shape == (2, 4, 16, 16)
        assert stack.compose({"inpaint": out}).channels.shape == (1, 4, 16, 16)
        with pytest.raises(ConditionInputError, match=r"32 x 32, but the model works at 64 x 64"):
            c.encode([GOOD])


def test_without_a_first_stage():
    c = build(ConditionerContext(image_size=32, latent_size=8, latent_channels=3))
    assert c.null(1).value.shape == (1, 4, 8, 8)  # building and nulls need no encoder
    with pytest.raises(RuntimeError, match="first stage"):
        c.encode([GOOD])
    pixel = build(ConditionerContext(image_size=32, latent_size=32, latent_channels=3))
    assert pixel.encode([GOOD]).value.shape == (1, 4, 32, 32)  # pixel space: identity


def test_known_region_helpers():
    c = build()
    inputs = c.prepare([GOOD])
    z, known = c.known_latents(inputs)
    assert z.shape == (1, 3, 8, 8) and known.shape == (1, 1, 8, 8)
    assert set(known.unique().tolist()) <= {0.0, 1.0}
    # a latent pixel is known only when none of its 4x4 pixels is unknown
    assert torch.equal(known[0, 0].bool(), ~torch.from_numpy(MASK).view(8, 4, 8, 4).any(3).any(1))
    image, known_px = c.known_pixels(inputs)
    assert image.shape == (1, 3, 32, 32) and torch.equal(known_px[0, 0].bool(), ~torch.from_numpy(MASK))


def test_field_derive_validate_and_schema():
    from ldmkit.data.shapes import ShapesWorld

    scene = ShapesWorld("train")[0]
    value = INPAINT.validate(inpaint_value(scene))
    assert value["image"] is scene.image and value["mask"] is scene.mask
    assert build().encode([value]).value.shape == (1, 4, 8, 8)
    with pytest.raises(ConditionInputError, match="inpaint"):
        INPAINT.validate({"image": scene.image})
    schema = INPAINT.json_schema()
    assert schema["required"] == ["image", "mask"] and "description" in schema
