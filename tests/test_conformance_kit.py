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
    # toys are not installed distributions: the discovery check is skipped explicitly
    ran = check_conditioner(spec, invalid_inputs=INVALID[spec.name], installed=False)
    assert ran == [c for c in CHECKS if c != "discovery"]  # a skipped check is not reported as run


# The one-line form, as a plugin author writes it (installed=False only because toys are not installed):
TestWordsConformance = conformance_tests(WORDS, invalid_inputs=INVALID["words"], installed=False)


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


def test_dropout_check_names_the_conditioner_whose_null_is_one_token_short():
    from toys import WORDS, Words

    def null(self, batch_size):  # M - 1 tokens: the null check says so, and dropout must too
        out = Words.null(self, batch_size)
        return ConditionOutput(Route.TOKENS, out.value[:, :-1], out.mask[:, :-1])

    msg = assert_caught(spec_for(broken("ShortNull", base=Words, null=null), WORDS), "dropout")
    assert "conditioner 'words'" in msg and "null(3) has shape (3, 3, 8)" in msg and "cannot mix" not in msg


def test_catches_null_that_does_not_follow_the_device():
    def null(self, batch_size):  # a bare tensor: stays on the CPU when the model moves
        return ConditionOutput(Route.VECTOR, torch.zeros(batch_size, self.output_dim) + 1.0)

    msg = assert_caught(spec_for(broken("Pinned", null=null)), "device")
    assert "meta" in msg and "buffer" in msg


def test_catches_null_that_does_not_follow_the_dtype():
    def null(self, batch_size):
        return ConditionOutput(Route.VECTOR, self.null_vec.float().to(self.null_vec.device).expand(batch_size, -1))

    assert "float64" in assert_caught(spec_for(broken("Single", null=null)), "device")


def test_catches_parameterless_conditioner_without_a_buffer():
    def init(self, config, context):
        Level.__init__(self, config, context)
        del self.lin, self.null_vec

    def null(self, batch_size):
        return ConditionOutput(Route.VECTOR, torch.zeros(batch_size, self.output_dim))

    assert "register_buffer" in assert_caught(spec_for(broken("Bare", __init__=init, null=null)), "device")


def test_discovery_is_skipped_only_when_asked():
    assert "installed=False" in assert_caught(LEVEL, "discovery")  # toys are not installed
    assert check_conditioner(LEVEL, checks=["discovery"], installed=False) == []


DISCOVERY_PLUGIN = """
from toys import LEVEL

{decorator}
def {hook}():
    return [LEVEL]
"""


@pytest.mark.parametrize("decorator,hook,message", [
    ("", "ldmkit_conditioners", "not decorated with @ldmkit.hookimpl"),
    ("from ldmkit import hookimpl\n@hookimpl", "ldmkit_conditioner", "did you mean ldmkit_conditioners"),
])
def test_discovery_catches_a_plugin_its_entry_point_cannot_load(tmp_path, monkeypatch, decorator, hook, message):
    """A missing @hookimpl or a misspelled hook passes every other check (they test the spec directly)."""
    from fixtures.dists import make_dist

    module = f"ldmkit_levelpkg_{'marked' if decorator else 'unmarked'}"  # a fresh module per case
    path = make_dist(tmp_path, "ldmkit-levelpkg", "levelpkg", module, DISCOVERY_PLUGIN.format(decorator=decorator, hook=hook))
    monkeypatch.syspath_prepend(str(path))  # importlib.metadata now sees its entry point
    checks = [c for c in CHECKS if c != "discovery"]
    assert check_conditioner(LEVEL, invalid_inputs=INVALID["level"], checks=checks) == checks
    msg = assert_caught(LEVEL, "discovery")
    assert "levelpkg" in msg and message in msg


def test_discovery_passes_for_a_correctly_installed_plugin_and_catches_a_clash(tmp_path, monkeypatch):
    from fixtures.dists import make_dist

    good = DISCOVERY_PLUGIN.format(decorator="from ldmkit import hookimpl\n@hookimpl", hook="ldmkit_conditioners")
    monkeypatch.syspath_prepend(str(make_dist(tmp_path / "a", "ldmkit-levelpkg", "levelpkg", "ldmkit_levelpkg_ok", good)))
    assert check_conditioner(LEVEL, checks=["discovery"]) == ["discovery"]
    monkeypatch.syspath_prepend(str(make_dist(tmp_path / "b", "ldmkit-levelpkg2", "levelpkg2", "ldmkit_levelpkg_two", good)))
    msg = assert_caught(LEVEL, "discovery")
    assert "'levelpkg'" in msg and "'levelpkg2'" in msg and "LDMKIT_DISABLE_PLUGINS" in msg


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
