"""JSON Schemas for ldmkit's configs, generated from the pydantic models.

``ldmkit schema --out schemas/`` writes them; ``ldmkit schema --check`` exits 1 when the committed
files differ from what the code generates. Only first-party plugins (those under ``plugins/`` in this
repository) contribute conditioner configs, so the output does not depend on what else is installed.
Output is stable: keys sorted, two-space indent, trailing newline.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field, create_model

from ldmkit.config import ConditioningConfig, LatentDiffusionConfig
from ldmkit.registry import Registry

__all__ = ["generate_schemas", "write_schemas", "check_schemas", "schema_providers"]


def _with_union(registry: Registry) -> type[BaseModel]:
    """LatentDiffusionConfig with its conditioner list typed as the registry's discriminated union."""
    union = registry.config_union()
    conditioning = create_model(
        "ConditioningConfig",
        __base__=ConditioningConfig,
        __doc__=ConditioningConfig.__doc__,
        conditioners=(list[union], Field(default_factory=list)),
    )
    model = create_model(
        "LatentDiffusionConfig",
        __base__=LatentDiffusionConfig,
        __doc__=LatentDiffusionConfig.__doc__,
        conditioning=(conditioning, Field(default_factory=conditioning)),
    )
    return model


def _model_schema(registry: Registry) -> dict[str, Any]:
    return _with_union(registry).model_json_schema()


def _diffusion_train_schema(registry: Registry) -> dict[str, Any]:
    from ldmkit.train.diffusion import DiffusionTrainConfig

    model = _with_union(registry)
    recipe = create_model("DiffusionTrainConfig", __base__=DiffusionTrainConfig, __doc__=DiffusionTrainConfig.__doc__,
                          model=(model, ...))
    return recipe.model_json_schema()


def schema_providers() -> dict[str, Callable[[Registry], dict[str, Any]]]:
    """File stem → function producing that schema. Other modules' models join here."""
    providers: dict[str, Callable[[Registry], dict[str, Any]]] = {
        "latent_diffusion": _model_schema,
        "diffusion_train": _diffusion_train_schema,
    }
    for stem, dotted in _OPTIONAL_MODELS.items():
        module_name, attr = dotted.rsplit(":", 1)
        try:
            module = __import__(module_name, fromlist=[attr])
        except ImportError:  # that part of ldmkit is not present in this build
            continue
        obj = getattr(module, attr)
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            providers[stem] = lambda _r, obj=obj: obj.model_json_schema()
        else:
            providers[stem] = lambda _r, obj=obj: obj()
    return providers


#: Schemas of other core models (file stem → "module:attribute"), included when the module exists.
_OPTIONAL_MODELS = {
    "manifest": "ldmkit.data.manifest:ManifestRecord",
    "autoencoder_train": "ldmkit.train.autoencoder:AutoencoderTrainConfig",
}


def generate_schemas(registry: Registry | None = None) -> dict[str, str]:
    """``{filename: text}`` for every schema, from first-party plugins unless a registry is given."""
    if registry is None:
        from ldmkit.plugins import get_plugin_manager

        registry = Registry(get_plugin_manager(first_party_only=True))
    out = {}
    for stem, make in sorted(schema_providers().items()):
        out[f"{stem}.schema.json"] = json.dumps(make(registry), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return out


def write_schemas(out_dir: str | Path, registry: Registry | None = None) -> list[Path]:
    """Write every schema into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate_schemas(registry).items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written


def check_schemas(out_dir: str | Path, registry: Registry | None = None) -> list[str]:
    """Problems found comparing committed schemas with generated ones (empty list = fresh)."""
    out_dir = Path(out_dir)
    problems = []
    expected = generate_schemas(registry)
    for name, text in expected.items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        current = path.read_text()
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(path), "generated", lineterm="", n=1)
            problems.append(f"{path}: stale\n" + "\n".join(list(diff)[:40]))
    for path in sorted(out_dir.glob("*.schema.json")):
        if path.name not in expected:
            problems.append(f"{path}: no model generates this file any more")
    return problems
