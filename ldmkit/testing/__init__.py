"""The conformance kit: checks every conditioner plugin should pass.

One line in a plugin's tests runs all of them as separate pytest tests::

    from ldmkit.testing import conformance_tests
    from my_plugin import SPEC

    TestMyConditioner = conformance_tests(SPEC, invalid_inputs=[-1, "cat", None])

or call :func:`check_conditioner` directly (it raises :class:`ConformanceError` naming the failed
check). Inputs default to the spec's ``example_inputs``; the config to the spec's config defaults.

The checks (see :data:`CHECKS`):

====================== ======================================================================
config_roundtrip       the config survives JSON and back unchanged
declared_route         the built conditioner declares the spec's route and its sizes up front
output_shape           ``forward`` returns the declared route, shape, a float dtype, finite values
null                   ``null(B)`` has the conditioned output's shape, dtype and mask; it differs
                       from at least one conditioned output (otherwise guidance is a no-op)
determinism            the same seed builds the same conditioner; repeated calls agree
batch_independence     sample i's output does not depend on the other samples in the batch
frozen                 with ``trainable: false`` nothing gets a gradient or changes in an
                       optimizer step, and ``train()`` leaves it in eval mode
safetensors_roundtrip  weights saved with safetensors load into a fresh instance, same outputs
dropout                dropout 1 gives the null output, dropout 0 the conditioned one
invalid_input          each invalid input raises ConditionInputError naming the field
====================== ======================================================================
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Sequence

import torch

from ldmkit.conditioning import Conditioner, ConditioningStack
from ldmkit.types import ConditionerConfig, ConditionerContext, ConditionerSpec, ConditionInputError, ConditionOutput, Route

__all__ = ["CHECKS", "ConformanceError", "ConditionerTests", "check_conditioner", "conformance_tests", "Harness"]


class ConformanceError(AssertionError):
    """A conditioner failed a conformance check; ``check`` names which."""

    def __init__(self, check: str, message: str):
        self.check = check
        super().__init__(f"[{check}] {message}")


class Harness:
    """Builds a spec's conditioner and feeds it inputs; shared by every check."""

    def __init__(
        self,
        spec: ConditionerSpec,
        config: dict[str, Any] | ConditionerConfig | None = None,
        inputs: Sequence[Any] | None = None,
        invalid_inputs: Sequence[Any] = (),
        context: ConditionerContext | None = None,
        atol: float = 1e-5,
    ):
        self.spec = spec
        if isinstance(config, ConditionerConfig):
            config = config.model_dump()
        self.config_data = {"type": spec.name, **(config or {})}
        self.inputs = list(inputs if inputs is not None else spec.example_inputs)
        if not self.inputs:
            raise ValueError(
                f"conformance kit: conditioner {spec.name!r} has no example_inputs; pass inputs=[...] (at least one)"
            )
        while len(self.inputs) < 3:
            self.inputs = self.inputs + self.inputs
        self.invalid_inputs = list(invalid_inputs)
        self.context = context or ConditionerContext()
        self.atol = atol

    def config(self, **overrides: Any) -> ConditionerConfig:
        return self.spec.config_cls.model_validate({**self.config_data, **overrides})

    def build(self, seed: int = 0, **overrides: Any) -> Conditioner:
        torch.manual_seed(seed)
        return self.spec.build(self.config(**overrides), self.context)

    def stack(self, seed: int = 0, **overrides: Any) -> ConditioningStack:
        return ConditioningStack([self.build(seed, **overrides)])

    def run(self, conditioner: Conditioner, values: Sequence[Any] | None = None) -> ConditionOutput:
        values = self.inputs if values is None else values
        out = conditioner.encode(list(values))
        if not isinstance(out, ConditionOutput):
            raise ConformanceError("output_shape", f"forward must return a ConditionOutput, got {type(out).__name__}")
        return out

    def close(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=self.atol, rtol=1e-4)


def _fail(check: str, message: str) -> None:
    raise ConformanceError(check, message)


def check_config_roundtrip(h: Harness) -> None:
    cfg = h.config()
    text = cfg.model_dump_json()
    again = h.spec.config_cls.model_validate_json(text)
    if again != cfg:
        _fail("config_roundtrip", f"config changed through JSON: {cfg!r} -> {again!r}")
    if json.loads(text).get("type") != h.spec.name:
        _fail("config_roundtrip", f"serialized type is {json.loads(text).get('type')!r}, expected {h.spec.name!r}")


def check_declared_route(h: Harness) -> None:
    c = h.build()
    if not isinstance(c, Conditioner):
        _fail("declared_route", f"build returned {type(c).__name__}, not an ldmkit.Conditioner")
    if not isinstance(getattr(c, "route", None), Route) or c.route not in h.spec.routes:
        _fail("declared_route", f"built conditioner declares route {getattr(c, 'route', None)!r}, spec says {h.spec.route_label}")
    if not isinstance(c.output_dim, int) or c.output_dim <= 0:
        _fail("declared_route", f"output_dim must be a positive int set in __init__, got {c.output_dim!r}")
    if c.route is Route.TOKENS and (not isinstance(c.num_tokens, int) or c.num_tokens <= 0):
        _fail("declared_route", f"a tokens conditioner must set num_tokens > 0 in __init__, got {c.num_tokens!r}")


def check_output_shape(h: Harness) -> None:
    c = h.build().eval()
    out = h.run(c)
    expected = c.output_shape(len(h.inputs))
    if out.route is not c.route:
        _fail("output_shape", f"forward returned route {out.route.value}, the conditioner declared {c.route.value}")
    if tuple(out.value.shape) != expected:
        _fail("output_shape", f"output shape {tuple(out.value.shape)} != declared {expected}")
    if not out.value.is_floating_point():
        _fail("output_shape", f"output dtype must be floating point, got {out.value.dtype}")
    if not torch.isfinite(out.value).all():
        _fail("output_shape", "output contains NaN or inf")


def check_null(h: Harness) -> None:
    c = h.build().eval()
    out = h.run(c)
    for batch in (len(h.inputs), 1):
        null = c.null(batch)
        if not isinstance(null, ConditionOutput):
            _fail("null", f"null() must return a ConditionOutput, got {type(null).__name__}")
        expected = c.output_shape(batch)
        if tuple(null.value.shape) != expected or null.route is not out.route:
            _fail("null", f"null({batch}) gives {null.route.value} {tuple(null.value.shape)}, conditioned gives {out.route.value} {expected}")
        if null.value.dtype != out.value.dtype:
            _fail("null", f"null dtype {null.value.dtype} != conditioned dtype {out.value.dtype}")
        if (null.mask is None) != (out.mask is None):
            _fail("null", "null and conditioned outputs must both have a mask or both have none")
    null = c.null(len(h.inputs))
    if all(h.close(out.value[i], null.value[i]) for i in range(len(h.inputs))):
        _fail("null", "null output equals every conditioned output: classifier-free guidance would do nothing")


def check_determinism(h: Harness) -> None:
    a = h.run(h.build(seed=1234).eval())
    b = h.run(h.build(seed=1234).eval())
    if not h.close(a.value, b.value):
        _fail("determinism", "two conditioners built under the same seed give different outputs")
    c = h.build(seed=1234).eval()
    first, second = h.run(c), h.run(c)
    if not h.close(first.value, second.value):
        _fail("determinism", "the same conditioner gives different outputs for the same input (in eval mode)")
    if a.mask is not None and not torch.equal(a.mask, b.mask):
        _fail("determinism", "masks differ between identical builds")


def check_batch_independence(h: Harness) -> None:
    c = h.build().eval()
    full = h.run(c)
    for i, value in enumerate(h.inputs):
        alone = h.run(c, [value])
        if not h.close(full.value[i : i + 1], alone.value):
            _fail("batch_independence", f"sample {i}'s output changes with the other samples in its batch")
        if full.mask is not None and not torch.equal(full.mask[i : i + 1], alone.mask):
            _fail("batch_independence", f"sample {i}'s mask changes with the other samples in its batch")
    rev = h.run(c, list(reversed(h.inputs)))
    if not h.close(rev.value, full.value.flip(0)):
        _fail("batch_independence", "reversing the batch does not reverse the outputs")


def check_frozen(h: Harness) -> None:
    stack = h.stack(trainable=False)
    c = next(iter(stack.conditioners.values()))
    stack.train()
    if c.training:
        _fail("frozen", "a frozen conditioner switched to training mode on stack.train()")
    if any(p.requires_grad for p in c.parameters()):
        _fail("frozen", "a frozen conditioner still has parameters with requires_grad=True")
    own = {id(p) for p in c.parameters()}
    if any(id(p) in own for p in stack.trainable_parameters()):
        _fail("frozen", "a frozen conditioner's parameters are offered to the optimizer")
    before = {k: v.detach().clone() for k, v in c.state_dict().items()}
    out = c.encode(h.inputs)
    if out.value.requires_grad:
        _fail("frozen", "a frozen conditioner's output requires grad")
    params = [p for p in stack.trainable_parameters()] or [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=0.1)
    composed = stack.compose(stack.encode({c.key: h.inputs}))
    loss = sum(t.float().pow(2).mean() for t in (composed.context, composed.channels, composed.vector) if t is not None)
    if torch.is_tensor(loss) and loss.requires_grad:
        loss.backward()
    opt.step()
    for k, v in c.state_dict().items():
        if not torch.equal(before[k], v):
            _fail("frozen", f"frozen tensor {k!r} changed in an optimizer step")


def check_safetensors_roundtrip(h: Harness) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    c = h.build(seed=1).eval()
    state = {k: v.detach().contiguous() for k, v in c.state_dict().items()}
    try:
        blob = st_save(state) if state else b""
    except Exception as exc:
        _fail("safetensors_roundtrip", f"state_dict cannot be saved with safetensors: {exc}")
    fresh = h.build(seed=2).eval()
    if state:
        loaded = st_load(blob)
        missing, unexpected = fresh.load_state_dict(loaded, strict=False)
        if missing or unexpected:
            _fail("safetensors_roundtrip", f"state_dict keys do not round-trip: missing {missing}, unexpected {unexpected}")
    if not h.close(h.run(c).value, h.run(fresh).value):
        _fail(
            "safetensors_roundtrip",
            "a fresh instance with the saved weights gives different outputs: some state is not in state_dict "
            "(register tensors as parameters or buffers)",
        )
    if not h.close(c.null(2).value, fresh.null(2).value):
        _fail("safetensors_roundtrip", "null() differs after loading the saved weights: keep the null in state_dict")


def check_dropout(h: Harness) -> None:
    for p, expect_null in ((1.0, True), (0.0, False)):
        stack = h.stack(dropout=p)
        stack.train()
        c = next(iter(stack.conditioners.values()))
        torch.manual_seed(0)
        with torch.no_grad():
            got = stack.compose(stack.encode({c.key: h.inputs}))
            stack.eval()
            ref_outputs = stack.nulls(len(h.inputs)) if expect_null else stack.encode({c.key: h.inputs})
            ref = stack.compose(ref_outputs)
        for field in ("context", "channels", "vector", "context_mask"):
            a, b = getattr(got, field), getattr(ref, field)
            if (a is None) != (b is None) or (a is not None and not h.close(a, b)):
                what = "null" if expect_null else "conditioned"
                _fail("dropout", f"with dropout={p} the stack's {field} is not the {what} output")


def check_invalid_input(h: Harness) -> None:
    if not h.invalid_inputs:
        _fail("invalid_input", "give at least one invalid input (invalid_inputs=[...]) so rejection is tested")
    c = h.build().eval()
    for bad in h.invalid_inputs:
        try:
            c.encode([h.inputs[0], bad])
        except ConditionInputError as exc:
            if c.key not in str(exc):
                _fail("invalid_input", f"the error for {bad!r} does not name the field {c.key!r}: {exc}")
            continue
        except Exception as exc:
            _fail("invalid_input", f"invalid input {bad!r} raised {type(exc).__name__} ({exc}) instead of ConditionInputError")
        _fail("invalid_input", f"invalid input {bad!r} was accepted")


CHECKS: dict[str, Callable[[Harness], None]] = {
    "config_roundtrip": check_config_roundtrip,
    "declared_route": check_declared_route,
    "output_shape": check_output_shape,
    "null": check_null,
    "determinism": check_determinism,
    "batch_independence": check_batch_independence,
    "frozen": check_frozen,
    "safetensors_roundtrip": check_safetensors_roundtrip,
    "dropout": check_dropout,
    "invalid_input": check_invalid_input,
}


def check_conditioner(
    spec: ConditionerSpec,
    *,
    config: dict[str, Any] | None = None,
    inputs: Sequence[Any] | None = None,
    invalid_inputs: Sequence[Any] = (),
    context: ConditionerContext | None = None,
    checks: Iterable[str] | None = None,
) -> list[str]:
    """Run the conformance checks (all, or those named); return their names. Raises ConformanceError."""
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; allowed: {', '.join(CHECKS)}")
    h = Harness(spec, config, inputs, invalid_inputs, context)
    for name in names:
        CHECKS[name](h)
    return names


class ConditionerTests:
    """Subclass in pytest and set ``spec`` (and optionally ``config``, ``inputs``, ``invalid_inputs``,
    ``context``); each check becomes its own test."""

    spec: ConditionerSpec
    config: dict[str, Any] | None = None
    inputs: Sequence[Any] | None = None
    invalid_inputs: Sequence[Any] = ()
    context: ConditionerContext | None = None

    def harness(self) -> Harness:
        return Harness(self.spec, self.config, self.inputs, self.invalid_inputs, self.context)


def _make_test(name: str) -> Callable[[ConditionerTests], None]:
    def test(self: ConditionerTests) -> None:
        CHECKS[name](self.harness())

    test.__name__ = f"test_{name}"
    test.__doc__ = f"conformance check: {name}"
    return test


for _name in CHECKS:
    setattr(ConditionerTests, f"test_{_name}", _make_test(_name))


def conformance_tests(
    spec: ConditionerSpec,
    *,
    config: dict[str, Any] | None = None,
    inputs: Sequence[Any] | None = None,
    invalid_inputs: Sequence[Any] = (),
    context: ConditionerContext | None = None,
) -> type[ConditionerTests]:
    """A pytest test class running every check on ``spec``: ``TestX = conformance_tests(SPEC, ...)``."""
    attrs = {
        "spec": spec,
        "config": config,
        "inputs": inputs,
        "invalid_inputs": tuple(invalid_inputs),
        "context": context,
        "__test__": True,
    }
    return type(f"Test{spec.name.title().replace('_', '')}Conformance", (ConditionerTests,), attrs)
