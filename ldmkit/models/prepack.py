"""Prepacked sampling on a CPU (``model.sample(..., prepack=True)``): fewer, cheaper operations per UNet call.

A UNet step at the zoo's 8 x 8 latents is hundreds of small operations, and in eager PyTorch each pays
fixed costs: a CPU convolution hands its weight to oneDNN in the plain ``(O, I, kH, kW)`` layout and oneDNN
reorders it into its blocked layout at every call; a linear layer with a bias first copies the bias into
every output row; every operation is a parallel region whose threads must wake. Inside :func:`prepacked`
(autograd off, so sampling only) the parts of the UNet built from this module's layers run differently:

- :class:`Conv2d` reorders its weight once (again only when the weight changes) and runs oneDNN's
  convolution on the packed weight, channels-last, with a ResBlock's residual add fused into it;
- :class:`Linear` runs large products as oneDNN's on a packed weight, bias and residual add fused (and
  GEGLU's GELU fused into its gate's product);
- :class:`GroupNorm` normalizes channels-last inputs in the plain memory order (faster, measured);
- attention (``ldmkit.models.attention``) projects q, k, v in one product and keeps the context's keys and
  values across the steps of a run; the UNet computes every ResBlock's timestep projection in one product.

Each is ``torch.nn``'s layer (same parameters, same state dict) outside the block. The arithmetic is the
same network; oneDNN may pick other kernels and sums may run in another order, so results differ from the
plain path by float rounding (about 1e-6 relative per layer) — hence opt-in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2d", "GroupNorm", "Linear", "Packable", "channels_last", "compute_dtype", "prepack_available",
           "prepacked", "version_of"]

_BF16: list[bool] = []  # whether oneDNN runs bfloat16 on this CPU (asked once)


def _dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the packed paths run: float32, and bfloat16 where oneDNN supports it on this CPU (AVX512-BW
    or newer; elsewhere bf16 autocast keeps the plain layers, which work everywhere)."""
    if not _BF16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        _BF16.append(bool(check()) if check is not None else False)
    return (torch.float32, torch.bfloat16) if _BF16[0] else (torch.float32,)


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype an autocast-eligible operation on ``device_type`` runs in: autocast's when it is on, else ``dtype``."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else dtype
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else dtype


def prepack_available() -> str | None:
    """None when this PyTorch can run prepacked sampling, else the reason it cannot."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch is built without oneDNN (mkldnn)"
    ops = ("_convolution_pointwise", "_linear_pointwise", "_reorder_linear_weight")
    if not all(hasattr(torch.ops.mkldnn, op) for op in ops) or not hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"):
        return f"this PyTorch ({torch.__version__}) lacks oneDNN's prepacked convolution and linear operators"
    return None


def version_of(t: torch.Tensor) -> int:
    """``t``'s in-place version counter (0 for an inference tensor, which has none)."""
    return 0 if t.is_inference() else t._version


class Packable:
    """Mixin for a module with a faster path inside :func:`prepacked`: ``packing()`` says whether to take it,
    ``_pack(name, tensors, build)`` caches ``build()`` while ``tensors`` (parameters) are unchanged."""

    _packs: dict | None = None  # None: prepacking off; a dict of cached packs inside prepacked()

    def packing(self) -> bool:
        return self._packs is not None and not torch.is_grad_enabled()

    def _pack(self, name: object, tensors: tuple[torch.Tensor, ...], build):
        key = tuple((t.data_ptr(), version_of(t), t.device) for t in tensors)
        hit = self._packs.get(name)  # type: ignore[union-attr]
        if hit is None or hit[0] != key:
            hit = (key, build())
            self._packs[name] = hit  # type: ignore[index]
        return hit[1]


class Conv2d(Packable, nn.Conv2d):
    """``nn.Conv2d`` with an optional fused residual (``forward(x, add)`` is ``add + conv(x)``) and a
    prepacked path used inside :func:`prepacked` (see the module docstring). Outside it, or wherever autograd
    records, it runs exactly as ``nn.Conv2d``."""

    #: Set by :mod:`ldmkit.models.compiled` around its compiled calls: a 3x3 convolution over an input of at most
    #: 2 x 2 positions runs as one matrix product (:meth:`_small_as_linear`); with ``build_small`` also set (an
    #: eager pass before compiling) each such layer first stores that product's weight as a buffer, which
    #: weight freezing then packs as a constant.
    small_as_linear = False
    build_small = False

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.packing() and x.device.type == "cpu":
            dtype = compute_dtype("cpu", x.dtype)
            if dtype in _dtypes() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
                return self._packed_forward(x.to(dtype), add)
        if Conv2d.small_as_linear and not torch.is_grad_enabled() and self._small_input(x):
            y = self._small_as_linear(x)
        else:
            y = super().forward(x)
        return y if add is None else add + y

    def _small_input(self, x: torch.Tensor) -> bool:
        """A 3x3, stride-1, zero-padded-by-1 convolution over at most 2 x 2 positions: every kernel tap that
        reaches a real input position is known, so the convolution is one (in·H·W) -> (out·H·W) product."""
        return (x.dim() == 4 and x.shape[-2] <= 2 and x.shape[-1] <= 2 and self.kernel_size == (3, 3)
                and self.stride == (1, 1) and self.padding == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros")

    def _small_weights(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The matrix product's weight and bias for an ``h x w`` input (see :meth:`_small_as_linear`)."""
        iy, ix = torch.arange(h, device=self.weight.device), torch.arange(w, device=self.weight.device)
        ky = iy[None, :] - iy[:, None] + 1  # (oy, iy)
        kx = ix[None, :] - ix[:, None] + 1  # (ox, ix)
        weight = self.weight[:, :, ky[:, None, :, None], kx[None, :, None, :]]  # (out, in, oy, ox, iy, ix)
        weight = weight.permute(0, 2, 3, 1, 4, 5).reshape(self.out_channels * h * w, self.in_channels * h * w)
        return weight, None if self.bias is None else self.bias.repeat_interleave(h * w)

    def _small_as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of :meth:`_small_input` as a matrix product: output position (oy, ox) takes input
        (iy, ix) through tap (iy - oy + 1, ix - ox + 1), which is inside the 3x3 kernel for every pair when
        H, W <= 2 — no padding arithmetic, the same sums in another order. oneDNN's direct kernels spend most
        of their time on the padding there (a 3x3 kernel over 2 x 2 positions touches 4 of its 9 taps)."""
        n, c, h, w = x.shape
        name = f"small_weight_{h}x{w}"
        if Conv2d.build_small and name not in self._buffers:  # kept: dynamo guards the frozen buffers by identity
            weight, bias = (t.detach().contiguous() if t is not None else None for t in self._small_weights(h, w))
            self.register_buffer(name, weight, persistent=False)
            self.register_buffer(f"small_bias_{h}x{w}", bias, persistent=False)
        if name in self._buffers:
            weight, bias = self._buffers[name], self._buffers[f"small_bias_{h}x{w}"]
        else:
            weight, bias = self._small_weights(h, w)
        bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x.reshape(n, c * h * w), weight.to(x.dtype), bias).view(n, self.out_channels, h, w)

    def _packed_forward(self, x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        def build():
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to(x.dtype).to_mkldnn(), list(self.padding), list(self.stride),
                list(self.dilation), self.groups, list(x.shape))
            return packed, None if self.bias is None else self.bias.detach().to(x.dtype)

        weights = (self.weight,) if self.bias is None else (self.weight, self.bias)
        packed, bias = self._pack(x.dtype, weights, build)
        args = (packed, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if add is not None and add.dtype == x.dtype and add.shape[0] == x.shape[0]:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, add.contiguous(memory_format=torch.channels_last), *args, "add", None, None, [], None)
        y = torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        return y if add is None else add + y


class GroupNorm(Packable, nn.GroupNorm):
    """``nn.GroupNorm``; inside :func:`prepacked`, a channels-last input (what a prepacked convolution gives) is
    normalized in the default memory order: PyTorch's channels-last GroupNorm is slower on a CPU — 1.8x at
    32 x 64 x 8 x 8 in float32, and about 15x at 512 x 64 x 8 x 8 in bfloat16 (measured) — than a copy and the
    plain kernel together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.packing() and x.dim() == 4 and not x.is_contiguous():
            x = x.contiguous()
        return super().forward(x)


class Linear(Packable, nn.Linear):
    """``nn.Linear`` with an optional fused residual (``forward(x, add)`` is ``add + linear(x)``). Inside
    :func:`prepacked`, products with at least :attr:`PACKED_MIN_ROWS` rows (or :attr:`PACKED_MIN_OUT` outputs)
    run as oneDNN's matrix product on a weight packed once — float32, or bfloat16 under bf16 autocast — with the
    bias and a same-dtype residual add fused (no broadcast copy of the bias into the output); smaller ones,
    where the oneDNN call costs more than it saves, stay plain. Outside it, exactly ``nn.Linear``."""

    PACKED_MIN_ROWS = 256
    PACKED_MIN_OUT = 512

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        dtype = self.packed_dtype(x)
        if dtype is not None:
            fuse = add is not None and add.dtype == dtype and add.shape == x.shape[:-1] + (self.out_features,)
            y = self.packed(x.to(dtype), add=add if fuse else None)
            return y if add is None or fuse else add + y
        y = super().forward(x)
        return y if add is None else add + y

    def packed_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the packed product would run in for ``x``, or None where the plain layer runs."""
        if not self.packing() or x.device.type != "cpu" or self.bias is None:
            return None
        dtype = compute_dtype("cpu", x.dtype)
        rows = x.numel() // max(x.shape[-1], 1)
        if dtype not in _dtypes() or (rows < self.PACKED_MIN_ROWS and self.out_features < self.PACKED_MIN_OUT):
            return None
        return dtype

    def packed(self, x: torch.Tensor, rows: slice | None = None, gelu: bool = False,
               add: torch.Tensor | None = None) -> torch.Tensor:
        """oneDNN's product of ``x`` (already in the packed dtype) with the weight's output ``rows`` (all by
        default), plus the bias, then exact GELU (``gelu``) or ``+ add`` fused into it."""
        part = rows or slice(None)

        def build():
            weight = self.weight.detach()[part].to(x.dtype)
            hint = x.numel() // max(x.shape[-1], 1)
            return (torch.ops.mkldnn._reorder_linear_weight(weight, hint), self.bias.detach()[part].to(x.dtype))

        weight, bias = self._pack((x.dtype, part.start, part.stop), (self.weight, self.bias), build)
        x = x.contiguous()
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add.contiguous(), weight, bias, "add")
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")  # "none": erf, not tanh
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def prepacked(module: nn.Module) -> Iterator[None]:
    """Inside this block, every :class:`Packable` part of ``module`` (convolutions, linear layers, group norms,
    attention, the UNet itself) runs prepacked when called without autograd on
    a CPU; the packed weights are dropped on leaving it."""
    reason = prepack_available()
    if reason:
        raise ValueError(f"prepack=True cannot run here: {reason}; sample without it")
    members = [m for m in module.modules() if isinstance(m, Packable)]
    previous = [m._packs for m in members]
    for m in members:
        m._packs = {} if m._packs is None else m._packs
    try:
        yield
    finally:
        for m, p in zip(members, previous):
            m._packs = p


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order (a 4-D tensor; others as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

