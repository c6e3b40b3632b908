"""Pydantic models for whole-model configs, and YAML loading.

Every model forbids unknown fields. The conditioner list is validated through the registry: each entry
is dispatched on its ``type`` to the config class of the plugin that provides it, so an unknown type
fails with ``no conditioner 'x'; installed: ...`` and a plugin's own fields are checked by its own model.
The JSON Schemas in ``schemas/`` are generated from these models with the first-party plugins
(``ldmkit schema``), where the conditioner list becomes a discriminated union on ``type``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from ldmkit.conditioning import StackConfig
from ldmkit.types import ConditionerConfig

__all__ = [
    "ConditioningConfig",
    "UNetConfig",
    "DiffusionConfig",
    "LatentDiffusionConfig",
    "ConfigError",
    "load_config",
    "load_yaml",
    "format_validation_error",
]


class ConfigError(ValueError):
    """A config file or mapping failed validation; the message names every bad field."""


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: message``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{prefix}{loc}: {msg}")
    return "\n".join(lines)


class ConditioningConfig(StackConfig):
    """The conditioner list plus how it is composed (context/vector widths, joint dropout)."""

    conditioners: list[SerializeAsAny[ConditionerConfig]] = Field(default_factory=list)

    @field_validator("conditioners", mode="before")
    @classmethod
    def _dispatch(cls, value: Any) -> Any:
        from ldmkit.registry import ConditionerConflictError, UnknownConditionerError, get_registry

        if not isinstance(value, list):
            return value
        registry = get_registry()
        out = []
        for i, item in enumerate(value):
            try:
                out.append(registry.parse_config(item))
            except (UnknownConditionerError, ConditionerConflictError) as exc:
                raise ValueError(f"conditioners.{i}.type: {exc}") from None
            except ValidationError as exc:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise ValueError(
                    f"conditioner {i} ({kind}) is invalid:\n" + format_validation_error(exc, f"  conditioners.{i}.")
                ) from None
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> "ConditioningConfig":
        names = [c.instance_name for c in self.conditioners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"conditioner names must be unique; duplicated: {', '.join(dupes)} (give one a `name:`)"
            )
        for group in self.dropout_groups:
            unknown = [n for n in group.names if n not in names]
            if unknown:
                raise ValueError(f"dropout_groups names unknown conditioner(s) {', '.join(unknown)}; have: {', '.join(names) or '(none)'}")
        return self


class UNetConfig(BaseModel):
    """The denoiser's size. Input channels, context width and vector width come from the stack."""

    model_config = ConfigDict(extra="forbid")
    model_channels: int = Field(default=64, ge=8)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(default=2, ge=1)
    attention_levels: list[int] = Field(default_factory=lambda: [1, 2], description="levels (0 = full resolution) with transformer blocks")
    num_heads: int = Field(default=4, ge=1)
    transformer_depth: int = Field(default=1, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    position_embedding: Literal["none", "sincos"] = Field(
        default="none",
        description="sincos: a fixed 2-D sine-cosine code of each token's normalized position is added to the "
                    "SpatialTransformer's tokens, so attention can use where a token is (spatial relations, boxes); "
                    "no parameters. none: position only through the convolutions (CompVis' UNet)")

    @model_validator(mode="after")
    def _levels(self) -> "UNetConfig":
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range; allowed 0..{len(self.channel_mult) - 1}")
        return self


class DiffusionConfig(BaseModel):
    """The forward process: T steps, the β schedule and what the network predicts."""

    model_config = ConfigDict(extra="forbid")
    timesteps: int = Field(default=1000, ge=2)
    schedule: Literal["scaled_linear", "cosine"] = "scaled_linear"
    linear_start: float = Field(default=0.0015, gt=0.0, lt=1.0)
    linear_end: float = Field(default=0.0195, gt=0.0, lt=1.0)
    parameterization: Literal["eps", "v", "x0"] = "eps"


class LatentDiffusionConfig(BaseModel):
    """A whole latent diffusion model: first stage, UNet, diffusion and conditioning."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["latent_diffusion"] = "latent_diffusion"
    image_size: int = Field(default=32, ge=8)
    autoencoder: str | None = Field(default=None, description="checkpoint path or zoo:NAME of the frozen first stage")
    latent_channels: int = Field(default=4, ge=1)
    downsample_factor: Literal[1, 2, 4, 8, 16, 32] = 4
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    conditioning: ConditioningConfig = Field(default_factory=ConditioningConfig)
    guidance: float | dict[str, float] = Field(
        default=1.0,
        description="classifier-free guidance used when the caller gives none: one scale (joint) or "
        "{conditioner name or condition key: scale}; 1 is no guidance. Zoo models store the scale their eval was run with",
    )

    @field_validator("guidance")
    @classmethod
    def _finite_guidance(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        import math

        scales = value.items() if isinstance(value, dict) else [("guidance", value)]
        bad = [f"{k}={v}" for k, v in scales if not math.isfinite(v)]
        if bad:
            raise ValueError(f"guidance scales must be finite numbers; got {', '.join(bad)}")
        return value

    @model_validator(mode="after")
    def _guided_names(self) -> "LatentDiffusionConfig":
        if isinstance(self.guidance, dict):
            names = [c.instance_name for c in self.conditioning.conditioners]
            keys = [k for k in dict.fromkeys(c.key for c in self.conditioning.conditioners) if k not in names]
            unknown = [k for k in self.guidance if k not in names and k not in keys]
            if unknown:
                raise ValueError(f"guidance names unknown conditioner(s) {', '.join(map(repr, unknown))}; "
                                 f"this model has: {', '.join(names) or '(none)'}"
                                 + (f" (or a condition key: {', '.join(keys)})" if keys else ""))
        return self

    @model_validator(mode="after")
    def _sizes(self) -> "LatentDiffusionConfig":
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by downsample_factor {self.downsample_factor}"
            )
        return self

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, with a clear error for a missing file or bad YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.stat().st_size > 10 * 1024 * 1024:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a config (limit 10 MiB)")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(source: str | Path | dict, model: type[BaseModel] = LatentDiffusionConfig) -> BaseModel:
    """Validate a config from a YAML path or a mapping; raises :class:`ConfigError` naming each field."""
    data = load_yaml(source) if isinstance(source, (str, Path)) else source
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}a config must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}invalid {model.__name__}:\n" + format_validation_error(exc, "  ")) from None
