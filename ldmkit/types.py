"""What plugin authors import: routes, outputs, the base config, the spec and the build context.

A conditioner (τθ in the LDM paper) maps raw user input to exactly one *route*:

========== ============================== ===========================================
route      output                         how the UNet uses it
========== ============================== ===========================================
tokens     ``(B, M, d)`` + mask ``(B, M)`` cross-attention context (keys and values)
channels   ``(B, C, h, w)``               concatenated to ``z_t`` at the UNet input
vector     ``(B, d)``                     added to the timestep embedding
========== ============================== ===========================================

The route is *declared* (:attr:`ConditionerSpec.route`), never inferred from a tensor's rank.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from ldmkit.conditioning import Conditioner

__all__ = [
    "Route",
    "ConditionOutput",
    "ConditionerConfig",
    "ConditionerContext",
    "ConditionerSpec",
    "ConditionInputError",
    "ConditionField",
    "RESERVED_FIELDS",
    "normalize_name",
    "NAME_PATTERN",
]

#: A conditioner name after normalization: lower-case ASCII, digits and underscores, starting with a letter.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def normalize_name(name: str) -> str:
    """Normalize a conditioner or plugin name: strip, lower-case, ``-`` and ``.`` become ``_``.

    >>> normalize_name(" Low-Res ")
    'low_res'
    """
    if not isinstance(name, str):
        raise TypeError(f"a name must be a string, got {type(name).__name__}")
    return re.sub(r"[-.]", "_", name.strip().lower())


class Route(str, Enum):
    """How the UNet consumes a conditioner's output."""

    TOKENS = "tokens"
    CHANNELS = "channels"
    VECTOR = "vector"


@dataclass
class ConditionOutput:
    """What a conditioner returns: a tensor on one route, plus a key-padding mask for tokens.

    ``mask`` is ``(B, M)`` bool with **True where a token is real** (attended to) and False for
    padding; it is required on the tokens route and must be None on the others.
    """

    route: Route
    value: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.route = Route(self.route)
        expected_rank = {Route.TOKENS: 3, Route.CHANNELS: 4, Route.VECTOR: 2}[self.route]
        if self.value.dim() != expected_rank:
            raise ValueError(
                f"a {self.route.value} output must have rank {expected_rank}, got shape {tuple(self.value.shape)}"
            )
        if self.route is Route.TOKENS:
            if self.mask is None:
                raise ValueError("a tokens output needs a key-padding mask of shape (B, M) (True = real token)")
            if self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.value.shape[:2]):
                raise ValueError(
                    f"tokens mask must be bool with shape {tuple(self.value.shape[:2])}, "
                    f"got {self.mask.dtype} {tuple(self.mask.shape)}"
                )
        elif self.mask is not None:
            raise ValueError(f"only tokens outputs carry a mask, not {self.route.value}")

    @property
    def batch_size(self) -> int:
        return int(self.value.shape[0])

    def select(self, keep: torch.Tensor, other: "ConditionOutput") -> "ConditionOutput":
        """Per sample, this output where ``keep`` is True, else ``other`` (e.g. the null)."""
        if other.value.shape != self.value.shape:
            raise ValueError(
                f"cannot mix outputs of shapes {tuple(self.value.shape)} and {tuple(other.value.shape)}"
            )
        shape = (-1,) + (1,) * (self.value.dim() - 1)
        value = torch.where(keep.view(shape), self.value, other.value.to(self.value.dtype))
        mask = None
        if self.mask is not None and other.mask is not None:
            mask = torch.where(keep.view(-1, 1), self.mask, other.mask)
        return ConditionOutput(self.route, value, mask)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text):,} characters in all)"


class ConditionInputError(ValueError):
    """Raised for bad user input to a conditioner; names the field and what is allowed."""

    #: Longest ``problem`` / ``allowed`` text kept: a 100,000-element value is not echoed whole.
    MAX_TEXT = 300

    def __init__(self, field: str, problem: str, allowed: str | None = None, index: int | None = None,
                 source: str | None = None):
        problem, allowed = _clip(str(problem), self.MAX_TEXT), _clip(allowed, self.MAX_TEXT) if allowed else allowed
        self.field = field
        self.problem = problem
        self.allowed = allowed
        self.index = index
        self.source = source  # where the value came from, when that says more than its index (a CLI flag)
        place = source or (f"sample {index}" if index is not None else None)
        where = f"condition '{field}'" + (f" ({place})" if place else "")
        message = f"{where}: {problem}"
        if allowed:
            message += f"; allowed: {allowed}"
        super().__init__(message)


class ConditionerConfig(BaseModel):
    """Base config of every conditioner. Subclasses narrow ``type`` to ``Literal["their-name"]``.

    - ``type``: the conditioner's registered name (the discriminator of the config union);
    - ``name``: this instance's name within a model (defaults to ``type``; must be unique per model),
      used for per-conditioner guidance scales and dropout groups;
    - ``key``: the batch field the conditioner reads (``label``, ``caption``, ``boxes``, ...);
    - ``dropout``: probability, during training, of replacing this conditioner's output by its null;
    - ``trainable``: False freezes it (no grad, eval mode, left out of the optimizer) — applied by the core.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    name: str | None = Field(default=None, pattern=NAME_PATTERN.pattern)
    key: str = Field(min_length=1)
    dropout: float = Field(default=0.1, ge=0.0, le=1.0)
    trainable: bool = True

    @property
    def instance_name(self) -> str:
        """The name this conditioner goes by in a model: ``name`` if set, else ``type``."""
        return self.name or self.type


@dataclass(frozen=True)
class ConditionerContext:
    """What the core knows about the model a conditioner is built for.

    - ``image_size``: pixel height/width the model is trained at;
    - ``latent_size``: latent height/width (``image_size // downsample_factor``);
    - ``latent_channels``: channels of the autoencoder's latent;
    - ``encode_image``: the frozen first stage's encoder (images in [-1, 1] → scaled latents), for
      conditioners that work in latent space (inpainting); None until a model is attached.
    """

    image_size: int = 32
    latent_size: int = 8
    latent_channels: int = 4
    encode_image: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    @property
    def downsample_factor(self) -> int:
        return self.image_size // self.latent_size


#: Field names the core owns: the image, free-form ``meta``, and the built-in condition fields of
#: :class:`~ldmkit.data.base.Sample`. A plugin cannot declare these (it reads them as they are).
RESERVED_FIELDS = ("image", "meta", "label", "caption", "boxes", "segmentation", "lowres", "mask")


@dataclass(frozen=True)
class ConditionField:
    """A condition field a plugin introduces: the name conditioners read, what it holds, where it comes from.

    - ``name``: the field's name, used everywhere a condition is named: a conditioner's ``key``, a
      manifest line (``{"image": "a.png", "palette": ["red"]}``), ``ldmkit sample --cond palette=...``,
      ``model(palette=[...])`` and error messages. Normalized like conditioner names; it may not be one
      of :data:`RESERVED_FIELDS`;
    - ``value_type``: the type of one sample's value, as a type annotation pydantic validates (``str``,
      ``list[str]``, ``list[tuple[int, int, int]]``, a pydantic model, ...). It must describe JSON-able
      values: manifests are validated with it and its JSON Schema is what ``ldmkit plugins --json`` shows;
    - ``derive``: optionally ``(sample) -> value or None``, computing the field from any
      :class:`~ldmkit.data.base.Sample` of a data set that does not store it (e.g. a palette from a
      shapes scene's ``meta["objects"]``). Returning None means "this sample cannot provide it";
    - ``description``: one line for ``ldmkit plugins`` and error messages;
    - ``example``: one valid value (docs, ``ldmkit plugins``).

    A sample's own value (a manifest's, or ``Sample.fields[name]``) wins over ``derive``.
    """

    name: str
    value_type: Any = Any
    derive: Callable[[Any], Any] | None = field(default=None, compare=False)
    description: str = ""
    example: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", normalize_name(self.name))
        if self.name in RESERVED_FIELDS:
            raise ValueError(f"condition field {self.name!r} is built in (reserved: {', '.join(RESERVED_FIELDS)}); "
                             "a conditioner reads it with `key:` instead of declaring it")
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"condition field name {self.name!r} is invalid: names must match {NAME_PATTERN.pattern}")

    @property
    def allowed(self) -> str:
        """What a valid value is, in words: the description, else a compact JSON Schema."""
        if self.description:
            return self.description
        schema = {k: v for k, v in self.json_schema().items() if k != "title"}
        return _short(json.dumps(schema, sort_keys=True), 200)

    @property
    def adapter(self) -> TypeAdapter:
        adapter = self.__dict__.get("_adapter")
        if adapter is None:
            adapter = TypeAdapter(self.value_type)
            object.__setattr__(self, "_adapter", adapter)
        return adapter

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of one sample's value (with the description when there is one)."""
        schema = dict(self.adapter.json_schema())
        if self.description:
            schema.setdefault("description", self.description)
        return schema

    def validate(self, value: Any, index: int | None = None) -> Any:
        """``value`` checked (and coerced) by ``value_type``; :class:`ConditionInputError` naming the field."""
        try:
            result = self.adapter.validate_python(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise ConditionInputError(self.name, f"{_short(value)} is invalid ({problems})", self.allowed, index) from None
        if _bool_coerced(value, result):  # pydantic's lax mode reads true/false as 1/0
            raise ConditionInputError(self.name, f"{_short(value)} is invalid (true/false where a number or string "
                                                 "is expected)", self.allowed, index)
        return result


def _bool_coerced(value: Any, result: Any) -> bool:
    """True when a bool in ``value`` became something else in ``result`` (same structure)."""
    if isinstance(value, bool):
        return not isinstance(result, bool)
    if isinstance(value, (list, tuple)) and isinstance(result, (list, tuple)) and len(value) == len(result):
        return any(_bool_coerced(v, r) for v, r in zip(value, result))
    if isinstance(value, dict) and isinstance(result, dict):
        return any(_bool_coerced(v, result[k]) for k, v in value.items() if k in result)
    return False


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



@dataclass(frozen=True)
class ConditionerSpec:
    """One conditioner a plugin provides, as returned by the ``ldmkit_conditioners`` hook.

    - ``name``: unique name (normalized with :func:`normalize_name`; must match ``config_cls``'s
      ``type`` literal);
    - ``config_cls``: a :class:`ConditionerConfig` subclass with ``type: Literal[name]``;
    - ``build``: ``(config, context) -> Conditioner`` (usually the Conditioner class itself);
    - ``route``: the declared route, or a tuple of routes when the config selects one (the built
      conditioner then declares which in ``__init__``, before any data flows);
    - ``description``: one line for ``ldmkit plugins``;
    - ``example_inputs``: a few valid raw inputs (used by docs and the conformance kit);
    - ``fields``: the :class:`ConditionField` objects this conditioner introduces (when its default
      ``key`` is a new field rather than a built-in one such as ``label`` or ``caption``).
    """

    name: str
    config_cls: type[ConditionerConfig]
    build: Callable[[Any, ConditionerContext], "Conditioner"]
    route: Route | tuple[Route, ...]
    description: str = ""
    example_inputs: tuple[Any, ...] = ()
    fields: tuple[ConditionField, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.route, (tuple, list)):
            routes = tuple(Route(r) for r in self.route)
            if not routes:
                raise ValueError(f"conditioner {self.name!r}: route must name at least one route")
            object.__setattr__(self, "route", routes[0] if len(routes) == 1 else routes)
        else:
            object.__setattr__(self, "route", Route(self.route))
        object.__setattr__(self, "name", normalize_name(self.name))
        object.__setattr__(self, "fields", tuple(self.fields))

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route this conditioner may take."""
        return self.route if isinstance(self.route, tuple) else (self.route,)

    @property
    def route_label(self) -> str:
        return "|".join(r.value for r in self.routes)
