"""Classifier-free guidance (Ho & Salimans 2021, "Classifier-Free Diffusion Guidance", arXiv:2207.12598).

Joint form (one scale for all conditions, Ho & Salimans Eq. 6 rewritten as in LDM's samplers)::

    ε = ε(∅) + s · (ε(c) − ε(∅))

Per-conditioner, composable form (Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models", arXiv:2206.01714, Eq. 9; DESIGN §2)::

    ε = ε(∅) + Σ_i s_i · (ε(c_i) − ε(∅))

where ``ε(c_i)`` keeps only conditioner ``i`` (or, named by a condition key, every conditioner reading that
key) and gives every other one its baseline value. The
baseline ``∅`` is each conditioner's ``null`` — or, with *negative conditioning*, a given condition
in its place (``negative_outputs``), and conditioners listed in ``always`` keep their real output in
every branch, the baseline included (e.g. an inpainting or super-resolution model's concatenated
channels while guiding on text).

All branches go through the model in **one batched call** per step: the composed conditioning of the
K branches is built once, concatenated along the batch, and reused every step, so τθ (``stack.encode``)
and the stack's projections never run inside the sampling loop. Branches whose weight is zero are not
evaluated: joint scale 1 runs only ``ε(c)``, scale 0 only ``ε(∅)``, and per-conditioner scales
summing to 1 skip the baseline.

The weights of the combination sum to 1, so applying it to ε, v or x_0 predictions gives the same
result (each is affine in the others at fixed ``(x_t, t)``): guide in the model's own output space and
wrap the result with :func:`ldmkit.diffusion.samplers.as_eps_denoiser` for the samplers.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ldmkit.conditioning import ConditioningStack, StackOutput
from ldmkit.types import ConditionOutput

__all__ = ["GuidedDenoiser", "concat_stack_outputs"]

UNetFn = Callable[..., torch.Tensor]
_FIELDS = tuple(f.name for f in fields(StackOutput))


def concat_stack_outputs(parts: Sequence[StackOutput]) -> StackOutput:
    """Concatenate composed conditionings along the batch axis (fields that are None stay None)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    merged: dict[str, torch.Tensor | None] = {}
    for name in _FIELDS:
        values = [getattr(p, name) for p in parts]
        present = [v is not None for v in values]
        if any(present) and not all(present):
            raise ValueError(f"cannot concatenate conditionings where only some have {name!r}")
        merged[name] = torch.cat(values, dim=0) if all(present) else None  # type: ignore[arg-type]
    return StackOutput(**merged)


class GuidedDenoiser:
    """A model callable ``(x_t, t) -> prediction`` with classifier-free guidance built in.

    Args:
        unet_fn: ``unet_fn(x, t, context=, context_mask=, channels=, vector=) -> prediction`` — the
            UNet (or any callable with its signature). It is called exactly once per ``__call__``.
        stack: the :class:`~ldmkit.conditioning.ConditioningStack` that produced ``outputs``.
        outputs: ``{name: ConditionOutput}`` from ``stack.encode(batch)`` — computed once per sample.
        scales: a float for the joint form, or ``{name: s_i}`` for the per-conditioner form (every
            name in ``outputs`` must then appear in ``scales`` or in ``always``; scale 0 drops it). A
            name may also be a condition key (e.g. ``caption``): its branch keeps every conditioner that
            reads that key together, e.g. two text towers on one caption guided as one condition.
        negative_outputs: ``{name: ConditionOutput}`` used instead of the null for those conditioners
            in the baseline branch (negative prompts).
        always: conditioners kept (real output) in every branch, baseline included.

    Attributes: ``branches`` (labels of the evaluated branches, in batch order), ``weights`` (their
    weights, summing to 1), ``calls`` (how many times ``unet_fn`` ran), ``conditioning`` (the
    precomputed, batch-concatenated :class:`StackOutput`).
    """

    def __init__(
        self,
        unet_fn: UNetFn,
        stack: ConditioningStack,
        outputs: Mapping[str, ConditionOutput],
        scales: float | Mapping[str, float] = 1.0,
        *,
        negative_outputs: Mapping[str, ConditionOutput] | None = None,
        always: Iterable[str] = (),
    ):
        self.unet_fn = unet_fn
        self.stack = stack
        outputs = dict(outputs)
        negative = dict(negative_outputs or {})
        always = list(always)
        known = set(stack.names)
        allowed = ", ".join(stack.names) or "(none)"
        for what, names in (("outputs", outputs), ("negative_outputs", negative), ("always", always)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise KeyError(f"{what}: no conditioner named {', '.join(map(repr, unknown))}; this model has: {allowed}")
        missing_always = [n for n in always if n not in outputs]
        if missing_always:
            raise ValueError(f"always: {', '.join(missing_always)} must also be given in outputs")
        both = [n for n in always if n in negative]
        if both:
            raise ValueError(f"{', '.join(both)} cannot be both in always and in negative_outputs")
        sizes = {o.batch_size for o in outputs.values()} | {o.batch_size for o in negative.values()}
        if len(sizes) > 1:
            raise ValueError(f"outputs and negative_outputs disagree on batch size: {sorted(sizes)}")
        if not sizes:
            raise ValueError("outputs is empty: encode at least one condition (or sample unconditionally)")
        self.batch_size = sizes.pop()

        baseline: dict[str, ConditionOutput] = {**negative, **{n: outputs[n] for n in always}}
        base_label = "negative" if negative else "uncond"
        variants: list[tuple[str, float, dict[str, ConditionOutput]]] = []
        if isinstance(scales, Mapping):
            scale_map = {n: _check_scale(s, n) for n, s in scales.items()}
            members = {n: stack.guided_names(n) for n in scale_map}
            unknown = [n for n, m in members.items() if not m]
            if unknown:
                keys = ", ".join(stack.guidance_keys())
                raise KeyError(f"scales: no conditioner named {', '.join(map(repr, unknown))}; this model has: {allowed}"
                               + (f" (or a condition key: {keys})" if keys else ""))
            unknown = [n for n, m in members.items() if any(c not in outputs for c in m)]
            if unknown:
                raise KeyError(f"scales: {', '.join(map(repr, unknown))} not in outputs; given: {', '.join(outputs)}")
            clash = [n for n, m in members.items() if any(c in always for c in m)]
            if clash:
                raise ValueError(f"scales: {', '.join(clash)} is in always (kept in every branch), so it cannot be guided")
            guided = [c for m in members.values() for c in m]
            twice = sorted({c for c in guided if guided.count(c) > 1})
            if twice:
                raise ValueError(f"scales: {', '.join(twice)} is given a scale twice (by name and by its key)")
            unguided = [n for n in outputs if n not in guided and n not in always]
            if unguided:
                raise ValueError(
                    f"outputs given for {', '.join(unguided)} but no scale: give each a scale "
                    "(0 leaves it out) or list it in always"
                )
            variants.append((base_label, 1.0 - math.fsum(scale_map.values()), baseline))
            for name, s in scale_map.items():
                variants.append((name, s, {**baseline, **{c: outputs[c] for c in members[name]}}))
            self.mode = "per_conditioner"
        else:
            s = _check_scale(scales, "scales")
            variants.append((base_label, 1.0 - s, baseline))
            variants.append(("cond", s, outputs))
            self.mode = "joint"
        # zero-weight branches are not evaluated (joint s=1 → cond only, s=0 → baseline only)
        kept = [v for v in variants if v[1] != 0.0] or variants[:1]
        self.has_baseline = kept[0] is variants[0]
        self.branches: list[str] = [label for label, _, _ in kept]
        self.weights: list[float] = [w for _, w, _ in kept]

        keep_all = {n: True for n in stack.names}
        with torch.no_grad():
            parts = [
                stack.compose(cond if cond else stack.nulls(self.batch_size), keep_all) for _, _, cond in kept
            ]
        self.conditioning = concat_stack_outputs(parts)
        self.calls = 0

    @classmethod
    def from_batch(
        cls,
        unet_fn: UNetFn,
        stack: ConditioningStack,
        batch: Mapping[str, Sequence[Any]],
        scales: float | Mapping[str, float] = 1.0,
        *,
        negative_batch: Mapping[str, Sequence[Any]] | None = None,
        always: Iterable[str] = (),
        device: Any = None,
    ) -> "GuidedDenoiser":
        """Encode ``batch`` (and ``negative_batch``) with the stack once, then build the denoiser.

        Only the conditioners whose key is in the batch are encoded.
        """
        with torch.no_grad():
            outputs = stack.encode(batch, names=stack.names_for(batch), device=device)
            negative = None
            if negative_batch is not None:
                negative = stack.encode(negative_batch, names=stack.names_for(negative_batch), device=device)
        return cls(unet_fn, stack, outputs, scales, negative_outputs=negative, always=always)

    @property
    def num_branches(self) -> int:
        """How many branches share each model call (the batch multiplier)."""
        return len(self.branches)

    def _conditioning_on(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        cond = self.conditioning
        first = next((getattr(cond, n) for n in _FIELDS if getattr(cond, n) is not None), None)
        if first is not None and first.device != device:
            self.conditioning = cond = StackOutput(
                **{n: (None if getattr(cond, n) is None else getattr(cond, n).to(device)) for n in _FIELDS}
            )
        return {n: getattr(cond, n) for n in _FIELDS}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        if batch != self.batch_size:
            raise ValueError(f"x_t has batch size {batch} but the conditions were encoded for {self.batch_size}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0 or t.numel() == 1:
            t = t.reshape(()).expand(batch)
        k = self.num_branches
        cond = self._conditioning_on(x_t.device)
        self.calls += 1
        if k == 1:
            return self.unet_fn(x_t, t, **cond)
        x_in = x_t.repeat(k, *([1] * (x_t.dim() - 1)))
        out = self.unet_fn(x_in, t.repeat(k), **cond)
        out = out.reshape(k, batch, *out.shape[1:])
        if self.has_baseline:
            base = out[0]
            result = base
            for s, branch in zip(self.weights[1:], out[1:]):
                result = result + s * (branch - base)
            return result
        result = self.weights[0] * out[0]
        for w, branch in zip(self.weights[1:], out[1:]):
            result = result + w * branch
        return result


def _check_scale(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"guidance scale for {name} must be a finite number, got {value!r}")
    return float(value)
