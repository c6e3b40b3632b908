"""The layout plugin: the conformance kit for both tokenizations, plus its own behaviour."""

from dataclasses import dataclass

import pytest
import torch

from ldmkit import ConditionInputError, ConditioningStack
from ldmkit.testing import conformance_tests
from ldmkit_layout import SHAPES_LABELS, SPEC, LayoutConfig

RED = {"label": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4]}

# Each is one sample's value; every one must be refused with a ConditionInputError naming `boxes`.
BAD = [
    None,                                                        # not a list
    "red circle",                                                # a string is not a list
    RED,                                                         # one object, not a list of them
    [{"label": "red circle", "bbox": [-0.1, 0.1, 0.4, 0.4]}],    # outside 0..1
    [{"label": "red circle", "bbox": [0.1, 0.1, 1.2, 0.4]}],     # outside 0..1
    [{"label": "red circle", "bbox": [0.4, 0.1, 0.1, 0.4]}],     # x1 < x0
    [{"label": "red circle", "bbox": [0.1, 0.3, 0.4, 0.3]}],     # y1 == y0
    [{"label": "red circle", "bbox": [0.1, float("nan"), 0.4, 0.4]}],
    [{"label": "red circle", "bbox": [0.1, 0.1, float("inf"), 0.4]}],
    [{"label": "red circle", "bbox": [0.1, "0.1", 0.4, 0.4]}],   # not a number
    [{"label": "red circle", "bbox": [0.1, True, 0.4, 0.4]}],    # bool is not a number
    [{"label": "red circle", "bbox": [0.1, 0.1, 0.4]}],          # 3 coordinates
    [{"label": "red circle", "bbox": "0.1 0.1 0.4 0.4"}],        # not a list
    [{"label": "purple circle", "bbox": [0.1, 0.1, 0.4, 0.4]}],  # unknown label
    [{"label": 18, "bbox": [0.1, 0.1, 0.4, 0.4]}],               # id out of range
    [{"label": -1, "bbox": [0.1, 0.1, 0.4, 0.4]}],
    [{"label": True, "bbox": [0.1, 0.1, 0.4, 0.4]}],             # bool is not an id
    [{"label": 2.0, "bbox": [0.1, 0.1, 0.4, 0.4]}],              # float is not an id
    [{"label": "red circle"}],                                   # no bbox
    [{"label": "red circle", "bbox": [0.1, 0.1, 0.4, 0.4], "score": 1}],  # unknown key
    [42],                                                        # not an object
    [RED] * 9,                                                   # more than max_objects (8)
]

TestLayoutObjectsConformance = conformance_tests(SPEC, invalid_inputs=BAD)
TestLayoutGridConformance = conformance_tests(SPEC, config={"tokenization": "grid", "dim": 64}, invalid_inputs=BAD)


@dataclass(frozen=True)
class FakeBox:  # duck-typed like ldmkit.data.base.Box
    label: str
    bbox: tuple[float, float, float, float]


def build(**config):
    torch.manual_seed(0)
    return SPEC.build(LayoutConfig(**config), None).eval()


def test_default_vocabulary_is_the_shapes_world():
    assert len(SHAPES_LABELS) == 18
    assert SHAPES_LABELS[:2] == ("red circle", "green circle")
    assert SHAPES_LABELS[14] == "blue triangle"  # class_id("triangle", "blue")
    from ldmkit.data.shapes import COLOURS, SHAPES, class_id  # the test (not the plugin) may check the core

    for s in SHAPES:
        for c in COLOURS:
            assert SHAPES_LABELS[class_id(s, c)] == f"{c} {s}"


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_bad_input_names_the_field_and_sample(bad):
    c = build()
    with pytest.raises(ConditionInputError) as info:
        c.encode([[RED], bad])
    assert info.value.field == "boxes" and info.value.index == 1
    assert "condition 'boxes' (sample 1)" in str(info.value)


def test_error_messages_are_specific():
    c = build(max_objects=4)
    with pytest.raises(ConditionInputError, match=r"object 0: unknown label 'purple circle'.*'red circle'.*0\.\.17"):
        c.encode([[{"label": "purple circle", "bbox": [0.1, 0.1, 0.4, 0.4]}]])
    with pytest.raises(ConditionInputError, match=r"object 1: bbox needs x0 < x1"):
        c.encode([[RED, {"label": 0, "bbox": [0.5, 0.1, 0.5, 0.4]}]])
    with pytest.raises(ConditionInputError, match=r"5 objects, more than max_objects=4"):
        c.encode([[RED] * 5])
    with pytest.raises(ConditionInputError, match=r"bbox has 5 coordinates"):
        c.encode([[{"label": 0, "bbox": [0.1, 0.1, 0.4, 0.4, 0.5]}]])
    with pytest.raises(ConditionInputError, match=r"unknown key\(s\) score"):
        c.encode([[{"label": 0, "bbox": [0.1, 0.1, 0.4, 0.4], "score": 1}]])


@pytest.mark.parametrize("tokenization", ["objects", "grid"])
def test_dict_box_like_and_ids_give_identical_outputs(tokenization):
    c = build(tokenization=tokenization)
    boxes = [("red circle", (0.1, 0.1, 0.4, 0.4)), ("blue triangle", (0.5, 0.55, 0.9, 0.95))]
    as_dicts = [{"label": label, "bbox": list(bbox)} for label, bbox in boxes]
    as_boxes = [FakeBox(label, bbox) for label, bbox in boxes]
    as_ids = [{"label": SHAPES_LABELS.index(label), "bbox": bbox} for label, bbox in boxes]
    as_messy = [{"label": "  Red  Circle ", "bbox": torch.tensor(boxes[0][1])}, {"label": torch.tensor(14), "bbox": boxes[1][1]}]
    outs = [c.encode([v]) for v in (as_dicts, as_boxes, as_ids, as_messy)]
    for o in outs[1:]:
        assert torch.equal(o.value, outs[0].value) and torch.equal(o.mask, outs[0].mask)


def test_shapes_world_boxes_are_accepted():
    from ldmkit.data.shapes import ShapesWorld

    world = ShapesWorld("train")
    c = build(max_objects=4)
    out = c.encode([world[i].boxes for i in range(8)])
    assert out.value.shape == (8, 4, 128)
    assert out.mask.sum(1).tolist() == [len(world[i].boxes) for i in range(8)]


def test_padding_and_mask():
    c = build(max_objects=5, dim=32)
    out = c.encode([[RED], [RED, RED, RED]])
    assert out.value.shape == (2, 5, 32)
    assert out.mask.tolist() == [[True, False, False, False, False], [True, True, True, False, False]]
    assert torch.all(out.value[0, 1:] == 0) and torch.all(out.value[1, 3:] == 0)
    assert torch.allclose(out.value[0, 0], out.value[1, 0])  # objects mode: a token depends on its object only
    grid = build(max_objects=5, dim=32, tokenization="grid")
    g = grid.encode([[RED], [RED, RED, RED]])
    assert g.value.shape == (2, 15, 32) and grid.num_tokens == 15
    assert g.mask.sum(1).tolist() == [3, 9] and torch.all(g.value[~g.mask] == 0)


def test_empty_list_is_the_null():
    for tokenization in ("objects", "grid"):
        c = build(tokenization=tokenization)
        out, null = c.encode([[], [RED]]), c.null(2)
        assert torch.equal(out.value[0], null.value[0]) and torch.equal(out.mask[0], null.mask[0])
        assert out.mask[0].tolist() == [True] + [False] * (c.num_tokens - 1)
        assert not torch.equal(out.value[1], null.value[1])


def test_null_has_one_real_token():
    c = build(max_objects=3)
    null = c.null(4)
    assert null.value.shape == (4, 3, 128)
    assert null.mask.tolist() == [[True, False, False]] * 4
    assert torch.all(null.value[:, 1:] == 0)


@pytest.mark.parametrize("tokenization", ["objects", "grid"])
def test_different_boxes_give_different_tokens(tokenization):
    c = build(tokenization=tokenization)
    base = c.encode([[RED]]).value
    moved = c.encode([[{"label": "red circle", "bbox": [0.5, 0.5, 0.8, 0.8]}]]).value
    relabelled = c.encode([[{"label": "green circle", "bbox": [0.1, 0.1, 0.4, 0.4]}]]).value
    assert (base - moved).abs().max() > 1e-3
    assert (base - relabelled).abs().max() > 1e-3


def test_nearby_boxes_get_nearer_tokens_than_distant_ones():
    c = build()
    def token(x):
        return c.encode([[{"label": 0, "bbox": [x, 0.2, x + 0.3, 0.5]}]]).value[0, 0]
    assert (token(0.1) - token(0.11)).norm() < (token(0.1) - token(0.6)).norm()


def test_objects_tokens_are_permutation_equivariant():
    c = build()
    a, b = RED, {"label": "cyan square", "bbox": [0.5, 0.5, 0.9, 0.9]}
    ab, ba = c.encode([[a, b]]).value, c.encode([[b, a]]).value
    assert torch.allclose(ab[0, 0], ba[0, 1]) and torch.allclose(ab[0, 1], ba[0, 0])


def test_grid_quantizes_corners():
    c = build(tokenization="grid", grid_size=4)
    near = c.encode([[{"label": 0, "bbox": [0.24, 0.26, 0.51, 0.74]}]]).value
    same = c.encode([[{"label": 0, "bbox": [0.26, 0.24, 0.49, 0.76]}]]).value
    assert torch.allclose(near, same)  # corners snap to the same lattice points (1/4, 1/4), (2/4, 3/4)


def test_custom_vocabulary_and_config_validation():
    c = build(labels=["cat", "dog"], dim=16)
    assert c.encode([[{"label": "dog", "bbox": [0, 0, 1, 1]}], [{"label": 0, "bbox": [0, 0, 0.5, 0.5]}]]).value.shape == (2, 8, 16)
    with pytest.raises(ConditionInputError, match="'cat', 'dog'"):
        c.encode([[{"label": "red circle", "bbox": [0, 0, 1, 1]}]])
    with pytest.raises(ValueError, match="unique"):
        LayoutConfig(labels=["cat", "Cat "])
    with pytest.raises(ValueError):
        LayoutConfig(labels=[])
    with pytest.raises(ValueError):
        LayoutConfig(max_objects=0)
    with pytest.raises(ValueError, match="grid_heads"):
        LayoutConfig(tokenization="grid", dim=30, grid_heads=4)
    with pytest.raises(ValueError):
        LayoutConfig(tokenization="rows")
    with pytest.raises(ValueError):
        LayoutConfig(boxes="x")  # extra fields are forbidden


def test_in_a_stack_and_gradients_flow():
    c = SPEC.build(LayoutConfig(max_objects=4, dim=64), None)
    stack = ConditioningStack([c])
    assert stack.wiring().context_tokens == 4
    out = stack.compose(stack.encode({"boxes": [[RED], [RED, RED]]}), keep={"layout": torch.tensor([True, False])})
    assert out.context.shape == (2, 4, 128) and out.context_mask.tolist() == [[True, False, False, False]] * 2
    out.context.sum().backward()
    assert c.null_token.grad is not None and c.label_embedding.weight.grad is not None


def test_registered_through_the_entry_point():
    from ldmkit import get_registry

    registry = get_registry()
    assert registry.get("layout") is SPEC
    config = registry.parse_config({"type": "layout", "max_objects": 4})
    assert isinstance(config, LayoutConfig) and config.key == "boxes"
