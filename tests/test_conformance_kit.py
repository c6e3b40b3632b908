"""The conformance kit passes good conditioners and catches each fault it exists for (one test per check)."""

import dataclasses

import pytest
import torch
from torch import nn

from ldmkit import ConditionOutput, Route
from ldmkit.testing import CHECKS, ConformanceError, check_conditioner, conformance_tests
from toys import LEVEL, MAP, WORDS, Level, LevelConfig

INVALID = {"words": [[], [99], "abc"], "map": ["x", [[1.0]]], "level": ["high", None, True]}


@pytest.mark.parametrize("spec", [WORDS, MAP, LEVEL], ids=lambda s: s.name)
def test_good_conditioners_pass_every_check(spec):
    assert check_conditioner(spec, invalid_inputs=INVALID[spec.name]) == list(CHECKS)


# The one-line form, as a plugin author writes it:
TestWordsConformance = conformance_tests(WORDS, invalid_inputs=INVALID["words"])


def broken(cls_name, base=Level, **methods):
    """A Level (vector) conditioner with some methods replaced."""
    return type(cls_name, (base,), methods)


def spec_for(cls, base_spec=LEVEL, **changes):
    return dataclasses.replace(base_spec, build=cls, **changes)


def assert_caught(spec, check, **kw):
    kw.setdefault("invalid_inputs", INVALID[spec.name] if spec.name in INVALID else ["bad"])
    with pytest.raises(ConformanceError) as info:
        check_conditioner(spec, checks=[check], **kw)
    assert info.value.check == check
    return str(info.value)


class ExtraCfg(LevelConfig):
    def model_dump_json(self, **kw):  # loses a field on the way out
        return super().model_dump_json(exclude={"dim"}, **kw)


def test_catches_config_that_does_not_roundtrip():
    spec = dataclasses.replace(LEVEL, config_cls=ExtraCfg)
    assert "JSON" in assert_caught(spec, "config_roundtrip", config={"dim": 3})


def test_catches_undeclared_output_dim():
    def init(self, config, context):
        Level.__init__(self, config, context)
        self.output_dim = 0

    assert "output_dim" in assert_caught(spec_for(broken("NoDim", __init__=init)), "declared_route")


def test_catches_wrong_route_class():
    cls = broken("WrongRoute", route=Route.CHANNELS)
    assert "route" in assert_caught(spec_for(cls), "declared_route")


def test_catches_wrong_output_shape():
    def forward(self, x):
        return ConditionOutput(Route.VECTOR, self.lin(x)[:, :-1])

    assert "declared" in assert_caught(spec_for(broken("Short", forward=forward)), "output_shape")


def test_catches_non_finite_output():
    def forward(self, x):
        return ConditionOutput(Route.VECTOR, self.lin(x) / 0.0)

    assert "NaN" in assert_caught(spec_for(broken("Nan", forward=forward)), "output_shape")


def test_catches_null_with_wrong_shape():
    def null(self, batch_size):
        return ConditionOutput(Route.VECTOR, self.null_vec.expand(1, -1))

    assert "null" in assert_caught(spec_for(broken("BadNull", null=null)), "null")


def test_catches_null_equal_to_conditioned():
    def forward(self, x):
        return ConditionOutput(Route.VECTOR, self.null_vec.expand(x.shape[0], -1) + 0 * x)

    assert "guidance" in assert_caught(spec_for(broken("Same", forward=forward)), "null")


def test_catches_nondeterminism():
    def forward(self, x):
        return ConditionOutput(Route.VECTOR, self.lin(x) + torch.rand(x.shape[0], self.output_dim, generator=None) * 0 + torch.randn(1))

    assert "different" in assert_caught(spec_for(broken("Noisy", forward=forward)), "determinism")


def test_catches_batch_dependence():
    def forward(self, x):
        y = self.lin(x)
        return ConditionOutput(Route.VECTOR, y - y.mean(0, keepdim=True))  # batch statistics leak

    assert "other samples" in assert_caught(spec_for(broken("BatchNorm", forward=forward)), "batch_independence")


def test_catches_conditioner_that_unfreezes_itself():
    def forward(self, x):
        for p in self.parameters():
            p.requires_grad_(True)
        return ConditionOutput(Route.VECTOR, self.lin(x))

    assert "frozen" in assert_caught(spec_for(broken("Thaw", forward=forward)), "frozen")


def test_catches_conditioner_that_keeps_training_mode():
    def train(self, mode=True):
        return nn.Module.train(self, mode)

    assert "training mode" in assert_caught(spec_for(broken("Trainee", train=train)), "frozen")


def test_catches_state_outside_state_dict():
    def init(self, config, context):
        Level.__init__(self, config, context)
        self.scale = torch.randn(config.dim)  # plain attribute: not saved

    def forward(self, x):
        return ConditionOutput(Route.VECTOR, self.lin(x) * self.scale)

    msg = assert_caught(spec_for(broken("Hidden", __init__=init, forward=forward)), "safetensors_roundtrip")
    assert "state_dict" in msg


def test_catches_dropout_not_replacing_by_null():
    # A stack cannot be fooled, so break the stack contract from the conditioner side: the conditioner
    # returns a null whose value differs between calls (so "dropped" samples are not its null).
    def null(self, batch_size):
        return ConditionOutput(Route.VECTOR, self.null_vec.expand(batch_size, -1) + torch.randn(batch_size, self.output_dim))

    assert "dropout" in assert_caught(spec_for(broken("Flaky", null=null)), "dropout")


def test_catches_torch_errors_on_invalid_input():
    def validate_one(self, value, index):  # no validation: the bad value reaches torch
        return value

    msg = assert_caught(spec_for(broken("Lax", validate_one=validate_one)), "invalid_input", invalid_inputs=["high"])
    assert "instead of ConditionInputError" in msg


def test_catches_accepted_invalid_input():
    def validate_one(self, value, index):
        return 0.0

    assert "accepted" in assert_caught(spec_for(broken("Yes", validate_one=validate_one)), "invalid_input", invalid_inputs=[5])


def test_requires_invalid_examples():
    assert "at least one invalid input" in assert_caught(LEVEL, "invalid_input", invalid_inputs=[])


def test_unknown_check_name():
    with pytest.raises(ValueError, match="allowed: config_roundtrip"):
        check_conditioner(LEVEL, checks=["nope"])


def test_every_check_has_a_catching_test():
    import sys

    module = sys.modules[__name__]
    source = open(module.__file__).read()
    for name in CHECKS:
        assert f'"{name}"' in source, f"no test shows the kit catching a fault in {name}"
