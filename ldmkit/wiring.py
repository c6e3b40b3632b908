"""From a model config to a built :class:`~ldmkit.conditioning.ConditioningStack` and its UNet wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmkit.conditioning import ConditioningStack, StackConfig
from ldmkit.config import LatentDiffusionConfig
from ldmkit.registry import Registry, get_registry
from ldmkit.types import ConditionerContext

__all__ = ["build_stack", "describe_wiring", "context_for"]


def context_for(config: LatentDiffusionConfig, encode_image: Any = None) -> ConditionerContext:
    """The build context conditioners of ``config`` see (image, latent size, latent channels)."""
    return ConditionerContext(
        image_size=config.image_size,
        latent_size=config.latent_size,
        latent_channels=config.latent_channels,
        encode_image=encode_image,
    )


def build_stack(config: LatentDiffusionConfig | dict | str | Path, registry: Registry | None = None,
                encode_image: Any = None) -> ConditioningStack:
    """Build every conditioner of ``config`` (a model config, a mapping or a YAML path) through its plugin
    and compose them in a stack."""
    config = _as_config(config)
    registry = registry or get_registry()
    context = context_for(config, encode_image)
    cond_cfg = config.conditioning
    conditioners = [registry.build(c, context) for c in cond_cfg.conditioners]
    stack_cfg = StackConfig(
        context_dim=cond_cfg.context_dim, vector_dim=cond_cfg.vector_dim, dropout_groups=cond_cfg.dropout_groups
    )
    return ConditioningStack(conditioners, stack_cfg)


def _as_config(config: Any) -> LatentDiffusionConfig:
    from ldmkit.config import load_config

    if isinstance(config, LatentDiffusionConfig):
        return config
    if isinstance(config, (dict, str, Path)):
        return load_config(config)  # a ConfigError naming the file and every bad field
    raise TypeError(f"expected a LatentDiffusionConfig, a mapping or a YAML path; got {type(config).__name__}")


def describe_wiring(config: LatentDiffusionConfig | dict | str | Path, registry: Registry | None = None) -> dict[str, Any]:
    """A JSON-ready description: each conditioner's route and size, and what the UNet is built with."""
    config = _as_config(config)
    registry = registry or get_registry()
    stack = build_stack(config, registry)
    wiring = stack.wiring()
    rows = []
    for c in stack.conditioners.values():
        shape = list(c.output_shape(1))[1:]
        rows.append(
            {
                "name": c.name,
                "type": c.config.type,
                "plugin": registry.providers.get(c.config.type),
                "key": c.key,
                "route": c.route.value,
                "output_shape": shape,
                "dropout": c.config.dropout,
                "trainable": c.config.trainable,
                "parameters": sum(p.numel() for p in c.parameters()),
            }
        )
    return {
        "image_size": config.image_size,
        "latent_shape": [config.latent_channels, config.latent_size, config.latent_size],
        "conditioners": rows,
        "unet": {
            "in_channels": config.latent_channels + wiring.extra_in_channels,
            "out_channels": config.latent_channels,
            **wiring.as_dict(),
        },
        "stack_parameters": sum(p.numel() for p in stack.parameters()),
        "trainable_stack_parameters": sum(p.numel() for p in stack.trainable_parameters()),
    }
