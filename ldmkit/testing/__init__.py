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
dropout                dropout 1 gives the null output, dropout 0 the conditioned one; a null
                       that cannot replace an output is reported naming the conditioner
invalid_input          each invalid input raises ConditionInputError naming the field
device                 ``null`` follows the module: on the meta device and in float64 it is
                       made there (create it from a parameter or a buffer, not a bare tensor)
discovery              the *installed* plugin, found through the ``ldmkit`` entry-point group
                       like any user finds it, yields this very spec under a name no other
                       plugin uses (catches a missing ``@hookimpl``, a misspelled hook, an
                       entry point pointing elsewhere, a name clash)
====================== ======================================================================

``discovery`` needs the distribution installed (``pip install -e .``). To unit-test a spec before it
is installed, say so explicitly: ``conformance_tests(SPEC, installed=False)`` (or
``check_conditioner(SPEC, installed=False)``) skips that one check.
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
        installed: bool = True,
    ):
        self.spec = spec
        self.installed = installed
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
        try:
            with torch.no_grad():  # one encode, in training mode: a conditioner may augment while training
                outputs = stack.encode({c.key: h.inputs})
                got = stack.compose(outputs)  # training dropout applies
                ref_outputs = stack.nulls(len(h.inputs)) if expect_null else outputs
                ref = stack.compose(ref_outputs, {c.name: True})
        except (ValueError, RuntimeError) as exc:
            _fail("dropout", f"with dropout={p} composing conditioner {c.name!r} failed: {exc}")
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


def check_device(h: Harness) -> None:
    c = h.build().eval()
    tensors = list(c.parameters()) + list(c.buffers())
    if not tensors:
        _fail("device", f"{type(c).__name__} has no parameter or buffer, so null() cannot know the device the "
                        "model was moved to; register one, e.g. self.register_buffer('anchor', torch.zeros(0), "
                        "persistent=False), and create the null with device=self.anchor.device")
    for target in (torch.device("meta"), torch.float64):
        moved = h.build().eval().to(target)
        try:
            null = moved.null(2)
        except Exception as exc:
            _fail("device", f"null(2) failed after .to({target}): {type(exc).__name__}: {exc}")
        if isinstance(target, torch.device):
            places = {"value": null.value.device, **({"mask": null.mask.device} if null.mask is not None else {})}
            wrong = {k: str(d) for k, d in places.items() if d.type != target.type}
            if wrong:
                _fail("device", f"after .to('{target}') null() made its {', '.join(wrong)} on {', '.join(set(wrong.values()))}: "
                                "create it from a parameter or buffer (device=self.some_buffer.device)")
        elif any(t.is_floating_point() for t in tensors) and null.value.dtype != target:
            _fail("device", f"after .to({target}) null() is {null.value.dtype}: build it from the module's "
                            "parameters/buffers (or dtype=...) so it follows the model's dtype")


def check_discovery(h: Harness) -> None:
    if not h.installed:
        return  # explicitly skipped: unit-testing a spec before its distribution is installed
    from ldmkit.plugins import ENTRY_POINT_GROUP, PluginManager
    from ldmkit.registry import Registry

    pm = PluginManager()
    pm.load_entry_points()
    registry = Registry(pm)
    name = h.spec.name
    if name in registry.conflicts:
        _fail("discovery", registry.conflict_message(name))
    found = registry.specs.get(name)
    if found is None:
        problems = [f"{r.name} ({r.distribution}): {r.error}" for r in pm.records.values() if r.status == "failed"]
        _fail("discovery",
              f"no installed plugin provides {name!r} through the {ENTRY_POINT_GROUP!r} entry-point group. "
              + (f"Failed plugins (the likely cause): {'; '.join(problems)}. " if problems else "")
              + f"Else: is the distribution installed (pip install -e .), does [project.entry-points."
              f"{ENTRY_POINT_GROUP}] point at the module, and is ldmkit_conditioners spelled right and decorated "
              "with @ldmkit.hookimpl? (to test a spec before installing it, pass installed=False)")
    if not (_same(found.config_cls, h.spec.config_cls) and _same(found.build, h.spec.build)):
        _fail("discovery", f"the installed plugin {registry.providers[name]!r} provides a different {name!r} "
                           f"({_qualname(found.build)}) than the spec under test ({_qualname(h.spec.build)})")
    for f in h.spec.fields:
        if f.name in registry.field_conflicts:
            _fail("discovery", registry.field_conflict_message(f.name))
        if f.name not in registry.fields:
            _fail("discovery", f"field {f.name!r} is declared by the spec but not registered by the installed plugin")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _same(a: Any, b: Any) -> bool:
    return a is b or _qualname(a) == _qualname(b)


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
    "device": check_device,
    "discovery": check_discovery,
}


def check_conditioner(
    spec: ConditionerSpec,
    *,
    config: dict[str, Any] | None = None,
    inputs: Sequence[Any] | None = None,
    invalid_inputs: Sequence[Any] = (),
    context: ConditionerContext | None = None,
    checks: Iterable[str] | None = None,
    installed: bool = True,
) -> list[str]:
    """Run the conformance checks (all, or those named); return their names. Raises ConformanceError.

    ``installed=False`` skips ``discovery`` (for a spec whose distribution is not installed yet)."""
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; allowed: {', '.join(CHECKS)}")
    h = Harness(spec, config, inputs, invalid_inputs, context, installed=installed)
    if not installed:
        names = [n for n in names if n != "discovery"]  # skipped, so not reported as run
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
    installed: bool = True

    def harness(self) -> Harness:
        return Harness(self.spec, self.config, self.inputs, self.invalid_inputs, self.context, installed=self.installed)


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
    installed: bool = True,
) -> type[ConditionerTests]:
    """A pytest test class running every check on ``spec``: ``TestX = conformance_tests(SPEC, ...)``.

    ``installed=False`` skips the ``discovery`` check, explicitly (before the plugin is installed)."""
    attrs = {
        "spec": spec,
        "config": config,
        "inputs": inputs,
        "invalid_inputs": tuple(invalid_inputs),
        "context": context,
        "installed": installed,
        "__test__": True,
    }
    return type(f"Test{spec.name.title().replace('_', '')}Conformance", (ConditionerTests,), attrs)
