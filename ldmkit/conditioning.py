"""The conditioner base class and the stack that composes conditioners for the UNet.

A :class:`Conditioner` is τθ for one modality. It declares its route and output size at construction
(so the UNet can be wired before any data flows), validates and collates raw input (:meth:`prepare`),
maps it to a :class:`~ldmkit.types.ConditionOutput` (:meth:`forward`) and knows its own unconditional
output (:meth:`null`).

A :class:`ConditioningStack` holds any number of conditioners and composes their outputs:

- tokens are projected to one context width and concatenated along the sequence axis (masks too);
- channels are concatenated along the channel axis (each checked against the latent size);
- vectors are projected to one width and summed (the UNet adds the sum to its timestep embedding).

During training each conditioner is replaced by its null with probability ``dropout`` (per sample),
and joint-dropout groups null several at once, so one model learns every subset of its conditions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ldmkit.types import (
    NAME_PATTERN,
    ConditionerConfig,
    ConditionerContext,
    ConditionInputError,
    ConditionOutput,
    Route,
)

__all__ = ["Conditioner", "ConditioningStack", "DropoutGroup", "StackConfig", "StackOutput", "UNetWiring"]


class Conditioner(nn.Module):
    """Base class of every conditioner (τθ).

    Subclasses set the class attribute ``route`` and, in ``__init__``, ``self.output_dim`` (``d`` for
    tokens and vector, ``C`` for channels) and, for tokens, ``self.num_tokens`` (``M``, fixed: pad to
    it and mark padding in the mask). They implement :meth:`validate_one` (raise
    :class:`ConditionInputError` on bad input), :meth:`collate`, :meth:`forward` and :meth:`null`.
    """

    route: ClassVar[Route]

    def __init__(self, config: ConditionerConfig, context: ConditionerContext):
        super().__init__()
        self.config = config
        self.context = context
        self.output_dim: int = 0
        self.num_tokens: int | None = None
        self.frozen = False
        self._latent_hw: tuple[int, int] | None = None

    # -- identity -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.instance_name

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The latent ``(height, width)`` a channels output must have *now*.

        The training size (``context.latent_size`` square) unless the stack is working at another size:
        sampling at 2x the training resolution sets it (:meth:`ConditioningStack.at_latent_size`) for the
        whole run, so ``forward`` and ``null`` of a channels conditioner read it rather than the context."""
        if self._latent_hw is not None:
            return self._latent_hw
        return (self.context.latent_size, self.context.latent_size)

    def output_shape(self, batch_size: int) -> tuple[int, ...]:
        """The shape of this conditioner's output for a batch, known before any data flows."""
        if self.route is Route.TOKENS:
            return (batch_size, int(self.num_tokens or 0), self.output_dim)
        if self.route is Route.CHANNELS:
            return (batch_size, self.output_dim, *self.latent_hw)
        return (batch_size, self.output_dim)

    # -- input ---------------------------------------------------------------------------------
    def validate_one(self, value: Any, index: int) -> Any:
        """Check (and normalize) one sample's raw input. Raise :class:`ConditionInputError`."""
        return value

    def collate(self, values: list[Any], device: torch.device) -> Any:
        """Turn a list of validated per-sample inputs into what :meth:`forward` takes."""
        raise NotImplementedError

    def prepare(self, values: Sequence[Any], device: torch.device | str = "cpu") -> Any:
        """Validate every sample, then collate. Bad input raises :class:`ConditionInputError`."""
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ConditionInputError(self.key, f"expected a list with one value per sample, got {type(values).__name__}")
        if len(values) == 0:
            raise ConditionInputError(self.key, "got an empty batch")
        checked = [self.validate_one(v, i) for i, v in enumerate(values)]
        return self.collate(checked, torch.device(device))

    def encode(self, values: Sequence[Any], device: torch.device | str = "cpu") -> ConditionOutput:
        """:meth:`prepare` then :meth:`forward` (under no_grad when frozen)."""
        prepared = self.prepare(values, device)
        if self.frozen:
            with torch.no_grad():
                return self(prepared)
        return self(prepared)

    # -- output --------------------------------------------------------------------------------
    def forward(self, inputs: Any) -> ConditionOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def null(self, batch_size: int) -> ConditionOutput:  # pragma: no cover - abstract
        """The unconditional output for classifier-free guidance, same shape as a real output."""
        raise NotImplementedError

    # -- known regions (optional) -------------------------------------------------------------
    def known_latents(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For conditioners that know part of the result (inpainting): ``(z0, known)`` for prepared
        inputs — the known latents ``(B, latent_channels, h, w)`` and ``(B, 1, h, w)``, 1 where a latent
        pixel is known — at :attr:`latent_hw`. Sampling then keeps that region (``keep_known``).
        The default, None, means "nothing known"."""
        return None

    def known_pixels(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image in [-1, 1] (B, 3, H, W), known (B, 1, H, W))`` to paste over the decoded result when
        sampling with ``paste=True``; None (the default) pastes nothing."""
        return None

    # -- freezing ------------------------------------------------------------------------------
    def freeze(self) -> "Conditioner":
        """No grad, eval mode, and kept in eval mode by ``train()``. Called by the core."""
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Conditioner":
        return super().train(mode and not self.frozen)

    def _device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")


class DropoutGroup(BaseModel):
    """Null every conditioner in ``names`` together with probability ``p`` (per sample)."""

    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(min_length=2)
    p: float = Field(ge=0.0, le=1.0)


class StackConfig(BaseModel):
    """How conditioners are composed: the common widths and joint-dropout groups."""

    model_config = ConfigDict(extra="forbid")
    context_dim: int = Field(default=128, ge=1, description="width tokens are projected to (UNet context width)")
    vector_dim: int = Field(default=128, ge=1, description="width vectors are projected to before summing")
    dropout_groups: list[DropoutGroup] = Field(default_factory=list)


@dataclass(frozen=True)
class UNetWiring:
    """What the UNet must be built with for a stack (all zero/None when a route is unused)."""

    context_dim: int | None
    context_tokens: int
    extra_in_channels: int
    vector_dim: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "context_dim": self.context_dim,
            "context_tokens": self.context_tokens,
            "extra_in_channels": self.extra_in_channels,
            "vector_dim": self.vector_dim,
        }


@dataclass
class StackOutput:
    """Composed conditioning, ready for the UNet."""

    context: torch.Tensor | None = None  # (B, M, context_dim)
    context_mask: torch.Tensor | None = None  # (B, M) bool, True = real token
    channels: torch.Tensor | None = None  # (B, C, h, w)
    vector: torch.Tensor | None = None  # (B, vector_dim)


class ConditioningStack(nn.Module):
    """Composes conditioners' outputs for the UNet (DESIGN §2).

    Typical use::

        outputs = stack.encode(batch)             # τθ once per sample: {name: ConditionOutput}
        composed = stack.compose(outputs)         # training: dropout applied when stack.training
        uncond = stack.compose(stack.nulls(B))    # the unconditional pass
    """

    def __init__(self, conditioners: Iterable[Conditioner], config: StackConfig | None = None):
        super().__init__()
        self.config = config or StackConfig()
        conditioners = list(conditioners)
        names = [c.name for c in conditioners]
        for name in names:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"conditioner name {name!r} is invalid; names match {NAME_PATTERN.pattern}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"conditioner names must be unique in a model; duplicated: {', '.join(duplicates)} "
                "(set `name:` on one of them)"
            )
        for group in self.config.dropout_groups:
            unknown = [n for n in group.names if n not in names]
            if unknown:
                raise ValueError(
                    f"dropout_groups: unknown conditioner(s) {', '.join(unknown)}; "
                    f"this model has: {', '.join(names) or '(none)'}"
                )
        self.conditioners = nn.ModuleDict({c.name: c for c in conditioners})
        self.token_proj = nn.ModuleDict()
        self.vector_proj = nn.ModuleDict()
        for c in conditioners:
            if not isinstance(c.route, Route):
                raise TypeError(f"conditioner {c.name!r} declares no valid route: {c.route!r}")
            if c.output_dim <= 0:
                raise ValueError(f"conditioner {c.name!r} must declare output_dim > 0 at construction")
            if c.route is Route.TOKENS:
                if not c.num_tokens or c.num_tokens <= 0:
                    raise ValueError(f"tokens conditioner {c.name!r} must declare num_tokens > 0")
                self.token_proj[c.name] = _projection(c.output_dim, self.config.context_dim)
            elif c.route is Route.VECTOR:
                self.vector_proj[c.name] = _projection(c.output_dim, self.config.vector_dim)
            if not c.config.trainable:
                c.freeze()

    # -- introspection ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.conditioners.keys())

    def by_route(self, route: Route) -> list[Conditioner]:
        return [c for c in self.conditioners.values() if c.route is route]

    def wiring(self) -> UNetWiring:
        """What the UNet must be built with: context width/length, extra input channels, vector width."""
        tokens = self.by_route(Route.TOKENS)
        vectors = self.by_route(Route.VECTOR)
        return UNetWiring(
            context_dim=self.config.context_dim if tokens else None,
            context_tokens=sum(int(c.num_tokens or 0) for c in tokens),
            extra_in_channels=sum(c.output_dim for c in self.by_route(Route.CHANNELS)),
            vector_dim=self.config.vector_dim if vectors else None,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer should see: frozen conditioners' parameters are left out."""
        return [p for p in self.parameters() if p.requires_grad]

    def accepted_keys(self) -> dict[str, list[str]]:
        """``{batch key: [names of the conditioners that read it]}`` (several may read one key)."""
        keys: dict[str, list[str]] = {}
        for c in self.conditioners.values():
            keys.setdefault(c.key, []).append(c.name)
        return keys

    def guided_names(self, name: str) -> list[str]:
        """The conditioners a guidance scale named ``name`` covers: that conditioner, or every conditioner
        reading the condition key ``name`` (names win over keys); empty if neither."""
        return [name] if name in self.conditioners else self.names_for([name])

    def guidance_keys(self) -> list[str]:
        """Condition keys usable as guidance names (those that are not also a conditioner's name)."""
        return [k for k in self.accepted_keys() if k not in self.conditioners]

    def names_for(self, keys: Iterable[str]) -> list[str]:
        """The conditioners that read any of ``keys``, in stack order."""
        wanted = set(keys)
        return [c.name for c in self.conditioners.values() if c.key in wanted]

    @contextmanager
    def at_latent_size(self, height: int, width: int) -> Iterator["ConditioningStack"]:
        """Within the block, channels conditioners work at latent size ``height x width`` (their
        :attr:`Conditioner.latent_hw`): inputs, outputs and nulls at that size. Used by sampling at a
        size other than the training one (convolutional sampling, paper §4.3.2)."""
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"latent size must be positive, got {height}x{width}")
        previous = {name: c._latent_hw for name, c in self.conditioners.items()}
        for c in self.conditioners.values():
            c._latent_hw = (int(height), int(width))
        try:
            yield self
        finally:
            for name, c in self.conditioners.items():
                c._latent_hw = previous[name]

    # -- encoding --------------------------------------------------------------------------------
    def encode(
        self, batch: Mapping[str, Sequence[Any]], *, names: Iterable[str] | None = None, device: Any = None
    ) -> dict[str, ConditionOutput]:
        """Run each conditioner (or those in ``names``) on its batch field. Missing fields are errors."""
        device = torch.device(device) if device is not None else self._device()
        if names is None:  # the whole batch is for this stack: a key no conditioner reads is a mistake
            unknown = [k for k in batch if k not in self.accepted_keys()]
            if unknown:
                raise ConditionInputError(
                    unknown[0], "no conditioner of this model reads it",
                    allowed=", ".join(sorted(self.accepted_keys())) or "(none)",
                )
        selected = list(names) if names is not None else self.names
        outputs: dict[str, ConditionOutput] = {}
        for name in selected:
            if name not in self.conditioners:
                raise KeyError(f"no conditioner named {name!r}; this model has: {', '.join(self.names)}")
            c = self.conditioners[name]
            if c.key not in batch:
                raise ConditionInputError(
                    c.key, "missing from the batch", allowed=", ".join(sorted(self.accepted_keys()))
                )
            outputs[name] = c.encode(batch[c.key], device)
        return outputs

    def nulls(self, batch_size: int) -> dict[str, ConditionOutput]:
        """Every conditioner's null output (the unconditional pass)."""
        return {name: c.null(batch_size) for name, c in self.conditioners.items()}

    def dropout_keep(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per conditioner, a (B,) bool tensor: True keeps the condition, False replaces it by null."""
        device = self._device()
        draw_on = generator.device if generator is not None else device  # a CPU generator may feed a GPU stack
        keep = {}
        for name, c in self.conditioners.items():
            u = torch.rand(batch_size, generator=generator, device=draw_on).to(device)
            keep[name] = u >= c.config.dropout
        for group in self.config.dropout_groups:
            u = torch.rand(batch_size, generator=generator, device=draw_on).to(device)
            dropped = u < group.p
            for name in group.names:
                keep[name] = keep[name] & ~dropped
        return keep

    def compose(
        self,
        outputs: Mapping[str, ConditionOutput],
        keep: Mapping[str, torch.Tensor | bool] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> StackOutput:
        """Compose per-conditioner outputs into UNet inputs.

        ``keep`` says, per conditioner, which samples keep their condition (a bool or a (B,) bool
        tensor); the rest get the conditioner's null. Missing entries in ``outputs`` are nulls. When
        ``keep`` is None the stack applies its training dropout if ``self.training``, else keeps all.
        """
        batch_sizes = {o.batch_size for o in outputs.values()}
        if len(batch_sizes) > 1:
            raise ValueError(f"conditioner outputs disagree on batch size: {sorted(batch_sizes)}")
        if not batch_sizes:
            raise ValueError("compose needs at least one output to know the batch size; use nulls(B)")
        batch_size = batch_sizes.pop()
        if keep is None and self.training:
            keep = self.dropout_keep(batch_size, generator)
        unknown = [n for n in outputs if n not in self.conditioners]
        if unknown:
            raise KeyError(f"no conditioner named {', '.join(unknown)}; this model has: {', '.join(self.names)}")

        final: dict[str, ConditionOutput] = {}
        for name, c in self.conditioners.items():
            out = outputs.get(name)
            k = None if keep is None else keep.get(name, True)
            if out is None:
                final[name] = c.null(batch_size)
                continue
            if out.route is not c.route:
                raise ValueError(f"conditioner {name!r} declared route {c.route.value} but returned {out.route.value}")
            if k is False:
                out = c.null(batch_size)
            elif isinstance(k, torch.Tensor) and not bool(k.all()):
                out = out.select(k.to(out.value.device), self._checked_null(c, out, batch_size))
            final[name] = out
        return self._combine(final, batch_size)

    def _checked_null(self, c: Conditioner, out: ConditionOutput, batch_size: int) -> ConditionOutput:
        """``c.null(B)``, checked to be mixable with ``out`` per sample (condition dropout)."""
        null = c.null(batch_size)
        problem = None
        if not isinstance(null, ConditionOutput) or null.route is not out.route:
            problem = f"its null({batch_size}) returned {getattr(null, 'route', type(null).__name__)!r}"
        elif tuple(null.value.shape) != tuple(out.value.shape):
            problem = (f"its null({batch_size}) has shape {tuple(null.value.shape)} but its output has "
                       f"{tuple(out.value.shape)}")
        if problem:
            raise ValueError(
                f"conditioner {c.name!r} ({c.route.value}, key {c.key!r}): {problem}; condition dropout replaces "
                f"samples' outputs by the null, so null(B) must have the conditioned output's route and shape "
                f"(declared {c.output_shape(batch_size)}; tokens: the same M, padding marked in the mask)"
            )
        return null

    def _combine(self, final: dict[str, ConditionOutput], batch_size: int) -> StackOutput:
        result = StackOutput()
        tokens, masks, channels, vectors = [], [], [], []
        for name, c in self.conditioners.items():
            out = final[name]
            expected = c.output_shape(batch_size)
            if tuple(out.value.shape) != expected:
                hint = ""
                if c.route is Route.CHANNELS and tuple(out.value.shape[2:]) != tuple(expected[2:]):
                    hint = (f"; the latent is {expected[2]}x{expected[3]} now (a channels conditioner builds its "
                            "output and its null at self.latent_hw, which sampling at another size changes)")
                raise ValueError(
                    f"conditioner {name!r} ({c.route.value}) returned shape {tuple(out.value.shape)}, "
                    f"declared {expected}{hint}"
                )
            if c.route is Route.TOKENS:
                tokens.append(self.token_proj[name](out.value))
                masks.append(out.mask)
            elif c.route is Route.CHANNELS:  # the declared shape includes the latent size: checked above
                channels.append(out.value)
            else:
                vectors.append(self.vector_proj[name](out.value))
        if tokens:
            result.context = torch.cat(tokens, dim=1)
            result.context_mask = torch.cat(masks, dim=1)
        if channels:
            result.channels = torch.cat(channels, dim=1)
        if vectors:
            result.vector = torch.stack(vectors, dim=0).sum(dim=0)
        return result

    def forward(self, batch: Mapping[str, Sequence[Any]]) -> StackOutput:
        """``compose(encode(batch))`` — with training dropout when in training mode."""
        return self.compose(self.encode(batch))

    def _device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")


def _projection(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)
