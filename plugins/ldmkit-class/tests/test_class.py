import pytest
import torch

from ldmkit import ConditionInputError, ConditioningStack
from ldmkit.testing import conformance_tests
from ldmkit_class import SPEC, ClassConfig

BAD = [-1, 18, 2.5, "dog", None, True]

TestClassTokensConformance = conformance_tests(SPEC, config={"route": "tokens"}, invalid_inputs=BAD)
TestClassVectorConformance = conformance_tests(SPEC, config={"route": "vector"}, invalid_inputs=BAD)


def test_routes_and_shapes():
    tok = SPEC.build(ClassConfig(route="tokens", dim=16), None)
    vec = SPEC.build(ClassConfig(route="vector", dim=16), None)
    assert tok.encode([1, 2]).value.shape == (2, 1, 16)
    assert vec.encode([1, 2]).value.shape == (2, 16)
    stack = ConditioningStack([tok, vec.__class__(ClassConfig(route="vector", dim=16, name="class_vec"), None)])
    w = stack.wiring()
    assert (w.context_tokens, w.vector_dim is not None) == (1, True)


def test_out_of_range_message_lists_allowed_ids():
    c = SPEC.build(ClassConfig(num_classes=10), None)
    with pytest.raises(ConditionInputError, match=r"label.*sample 1.*0\.\.9"):
        c.encode([3, 10])


def test_numpy_and_tensor_scalars_accepted():
    import numpy as np

    c = SPEC.build(ClassConfig(), None)
    out = c.encode([np.int64(3), torch.tensor(4)])
    assert out.value.shape == (2, 1, 128)
