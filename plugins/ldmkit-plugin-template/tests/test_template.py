"""The template's own tests: the whole conformance kit in one line, plus the plugin's specifics."""

import pytest

from ldmkit import ConditionInputError
from ldmkit.testing import conformance_tests
from ldmkit_plugin_template import SPEC, ScalarConfig

# One line runs every conformance check as its own test.
TestScalarConformance = conformance_tests(SPEC, invalid_inputs=[-0.5, 1.5, "bright", None, float("nan"), True])


def test_range_is_validated():
    with pytest.raises(ValueError, match="low"):
        ScalarConfig(low=1.0, high=0.0)


def test_error_names_field_and_range():
    cond = SPEC.build(ScalarConfig(key="brightness", high=2.0), None)
    with pytest.raises(ConditionInputError, match=r"brightness.*sample 1.*\[0.0, 2.0\]"):
        cond.encode([0.5, 3.0])


def test_nearby_values_get_nearby_vectors():
    cond = SPEC.build(ScalarConfig(), None).eval()
    out = cond.encode([0.5, 0.51, 0.99]).value
    assert (out[0] - out[1]).norm() < (out[0] - out[2]).norm()
