"""Compiled sampling on a CPU (``model.sample(..., compile=True)``): the UNet step as one inductor graph.

A UNet step at the zoo's 8 x 8 latents is hundreds of small operations; in eager PyTorch each pays a Python
call, a dispatch and a parallel region. Inside :func:`compiled` (autograd off, so sampling only) the UNet's
forward runs through ``torch.compile`` (inductor) with weight freezing: the weights become constants, the
convolution and linear weights are reordered once for oneDNN, and the elementwise work between them
(GroupNorm, SiLU, GELU, residual adds) is fused into generated C++ loops. Measured on the benchmark's UNet
(docs/performance.md): 1.56-1.60x diffusers' eager UNet per step at batch 32, after a compile of about
40 s on 2 cores, repaid after some 1,700 steps of one batch shape (about 24 ms saved per step at batch 32):
for processes that sample again and again, not for a single run (docs/performance.md has the measurements).

The arithmetic is the same network; the generated code sums in another order, so results differ from the
plain path by float rounding — hence opt-in. While it traces, a 3x3 convolution over at
most 2 x 2 positions (the UNet's deepest level at 8 x 8 latents) runs as one matrix product
(:meth:`ldmkit.models.prepack.Conv2d._small_as_linear`), which oneDNN's direct kernels are slow at. Because
freezing bakes the weights into the compiled code, the first call in each :func:`compiled` block checks that
the weights are those it compiled (every parameter's storage and in-place version; weights changed in the
middle of a block are not noticed); if they changed, it compiles again (dropping this function's compiled
code: ``torch._dynamo.reset_code``, or on a PyTorch without it ``torch._dynamo.reset()``, which drops every
compiled function of the process). If compilation fails (no C++ compiler, an unsupported operator, a
graph break, dynamo's limit of 8 compiled variants of one function — models x batch shapes x precisions
— in a process), the UNet continues on the plain path with one warning, for the rest of the process.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ldmkit.models.prepack import Conv2d, version_of

__all__ = ["CompiledForward", "compiled", "compiled_state"]


def _fingerprint(module: nn.Module) -> tuple:
    """The identity of ``module``'s weights: each parameter's and saved buffer's storage, in-place version and
    dtype (the buffers :class:`Conv2d` derives for compiling are rebuilt from these)."""
    return tuple((t.data_ptr(), version_of(t), t.dtype) for t in module.state_dict(keep_vars=True).values())


class CompiledForward:
    """``forward(module, *args)`` (the module's plain forward, unbound) through ``torch.compile`` with inductor
    weight freezing.

    Called without autograd; compiled at the first call (and again for a new input shape or when the
    weights changed); ``seconds`` totals the compile time spent, ``failed`` holds the reason compilation
    was given up (the calls then run ``forward`` itself). Holds the module weakly."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self.module = weakref.ref(module)
        self.forward = forward
        self.fn: Callable[..., Any] | None = None
        self.weights: tuple | None = None
        self.shapes: set[tuple] = set()
        self.seconds = 0.0
        self.failed: str | None = None
        self.check = True  # compare the weights with the compiled ones at the next call

    def __call__(self, *args: Any) -> Any:
        module = self.module()
        if module is None:
            raise RuntimeError("the compiled module no longer exists")
        if self.failed is not None:
            return self.forward(module, *args)
        import torch._dynamo
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        if self.fn is None or self.check:  # once per compiled() block: 1.2 ms for the benchmark's UNet
            weights = _fingerprint(module)
            if self.fn is None or weights != self.weights:
                if self.weights is not None:  # the frozen constants are stale: drop what was compiled from them
                    _drop_small_weights(module)
                    if hasattr(torch._dynamo, "reset_code"):  # this function's compiled code only
                        torch._dynamo.reset_code(self.forward.__code__)
                    else:
                        torch._dynamo.reset()
                    self.shapes.clear()
                # fullgraph: a graph break or dynamo's recompile limit raises into the fallback below
                # instead of running eagerly unannounced
                self.fn = torch.compile(self.forward, dynamic=False, fullgraph=True)
                self.weights = weights
            self.check = False
        shape = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a is None for a in args)
        new = shape not in self.shapes
        start = time.perf_counter()
        Conv2d.small_as_linear = True
        try:
            if new:  # one eager pass stores missing small-convolution product weights, frozen as constants below
                Conv2d.build_small = True
                try:
                    self.forward(module, *args)
                finally:
                    Conv2d.build_small = False
            limit = {"fail_on_recompile_limit_hit": True} if hasattr(dynamo_config, "fail_on_recompile_limit_hit") else {}
            with inductor_config.patch(freezing=True), dynamo_config.patch(**limit):
                out = self.fn(module, *args)
        except Exception as err:  # noqa: BLE001 - compilation may fail in many ways; the plain path decides
            Conv2d.small_as_linear = False
            out = self.forward(module, *args)  # a real error of the inputs raises here, as without compile
            text = str(err).strip()
            self.failed = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
            warnings.warn(f"torch.compile of the UNet failed ({self.failed}); sampling continues without it "
                          "(for this UNet, for the rest of the process)", RuntimeWarning, stacklevel=2)
            return out
        finally:
            Conv2d.small_as_linear = False
        if new:
            self.shapes.add(shape)
            self.seconds += time.perf_counter() - start
        return out


def _drop_small_weights(module: nn.Module) -> None:
    """Remove the product weights :class:`Conv2d` derived for compiling (rebuilt from the current weights)."""
    for m in module.modules():
        if isinstance(m, Conv2d):
            for name in [n for n in m._buffers if n.startswith("small_")]:
                del m._buffers[name]


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its CompiledForward


@contextlib.contextmanager
def compiled(module: nn.Module, forward: Callable[..., Any]) -> Iterator[CompiledForward]:
    """Inside this block ``module``'s calls without autograd run ``forward(module, ...)`` compiled (the module
    checks ``module._compiling``); on leaving it the module runs eagerly again. The
    :class:`CompiledForward` is kept per module, so a later block reuses what was compiled while the weights
    are unchanged."""
    state = _STATES.get(module)
    if state is None:
        state = _STATES[module] = CompiledForward(module, forward)
    previous = module.__dict__.get("_compiling", False)
    module._compiling = True
    state.check = True
    try:
        yield state
    finally:
        module._compiling = previous


def compiled_state(module: nn.Module) -> CompiledForward | None:
    """The :class:`CompiledForward` that :func:`compiled` made for ``module`` (None for a module it has not
    seen, such as a copy taken inside the block)."""
    return _STATES.get(module)
