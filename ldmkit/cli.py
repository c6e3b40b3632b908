"""The ``ldmkit`` command.

Each subcommand is a small function ``cmd_<name>(args) -> int``; :func:`main` maps ldmkit's own errors
(bad configs, bad input, broken plugins) to a one-paragraph message and exit status 2 (1 for plugin
failures in strict mode), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ldmkit import __version__

__all__ = ["main", "build_parser"]

DEFAULT_DEMO_CONFIG = "configs/ldm/compose-demo.yaml"


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# -- plugins ----------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    from ldmkit.plugins import get_plugin_manager
    from ldmkit.registry import get_registry

    pm = get_plugin_manager()
    registry = get_registry()  # calls every plugin's hook: fills in conditioners, marks failures and conflicts
    records = [r.as_dict() for r in sorted(pm.records.values(), key=lambda r: r.name)]
    if args.json:
        for r in records:  # each declared field with its JSON Schema, so tools can build inputs
            r["fields"] = [_field_row(registry, name, r["name"]) for name in r["fields"]]
        print(json.dumps(records, indent=2))
    else:
        if not records:
            print("no ldmkit plugins installed (entry-point group 'ldmkit')")
        for r in records:
            conds = ", ".join(r["conditioners"]) or "-"
            print(f"{r['name']:<20} {r['version'] or '-':<10} {r['status']:<8} {conds}")
            if r["fields"]:
                print(f"{'':<20} fields: {', '.join(r['fields'])}")
            if r["error"]:
                print(f"{'':<20} error: {r['error']}")
    for name in sorted(registry.conflicts):
        print(f"ldmkit: warning: {registry.conflict_message(name)}", file=sys.stderr)
    for name in sorted(registry.field_conflicts):
        print(f"ldmkit: warning: {registry.field_conflict_message(name)}", file=sys.stderr)
    return 0


def _field_row(registry: Any, name: str, plugin: str) -> dict[str, Any]:
    field = registry.declared_fields[name][plugin]  # this plugin's own declaration, even when it clashes
    return {"name": name, "schema": field.json_schema(), "derived": field.derive is not None,
            "description": field.description, "example": field.example,
            "error": registry.field_conflict_message(name) if name in registry.field_conflicts else None}


# -- schema -----------------------------------------------------------------------------------
def cmd_schema(args: argparse.Namespace) -> int:
    from ldmkit.schema import check_schemas, write_schemas

    out = Path(args.out)
    if args.check:
        problems = check_schemas(out)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            print(f"schemas in {out} are stale; regenerate with: ldmkit schema --out {out}", file=sys.stderr)
            return 1
        print(f"schemas in {out} are up to date")
        return 0
    for path in write_schemas(out):
        print(f"wrote {path}")
    return 0


# -- wiring -----------------------------------------------------------------------------------
def _print_wiring(desc: dict[str, Any]) -> None:
    print(f"image {desc['image_size']}x{desc['image_size']} -> latent {tuple(desc['latent_shape'])}")
    print(f"{'conditioner':<14} {'plugin':<18} {'key':<12} {'route':<9} {'output (per sample)':<20} {'dropout':<8} trainable")
    for row in desc["conditioners"]:
        shape = "x".join(str(s) for s in row["output_shape"])
        print(
            f"{row['name']:<14} {row['plugin'] or '-':<18} {row['key']:<12} {row['route']:<9} {shape:<20} "
            f"{row['dropout']:<8} {row['trainable']}"
        )
    u = desc["unet"]
    print(
        f"UNet: in_channels={u['in_channels']} (latent {desc['latent_shape'][0]} + channels route "
        f"{u['extra_in_channels']}), context_dim={u['context_dim']} x {u['context_tokens']} tokens, "
        f"vector_dim={u['vector_dim']}, out_channels={u['out_channels']}"
    )


def cmd_wiring(args: argparse.Namespace) -> int:
    from ldmkit.config import load_config
    from ldmkit.wiring import describe_wiring

    from ldmkit.config import ConfigError, load_yaml

    data = load_yaml(args.config)
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: a model config must be a YAML mapping, got "
                          f"{'an empty file' if data is None else type(data).__name__}")
    if isinstance(data.get("model"), dict) and "steps" in data:
        data = data["model"]  # a training recipe: wire its model
    try:
        desc = describe_wiring(load_config(data))
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    from ldmkit.fields import UnknownFieldError, check_keys

    readers: dict[str, list[str]] = {}
    for row in desc["conditioners"]:
        readers.setdefault(row["key"], []).append(row["name"])
    try:
        check_keys(readers)
    except UnknownFieldError as exc:  # fine for `stack(...)` and --cond, but no data set can train it
        print(f"ldmkit: warning: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        _print_wiring(desc)
    return 0


# -- quickstart (the README's main command) ---------------------------------------------------
def cmd_quickstart(args: argparse.Namespace) -> int:
    """What is installed, and how a composed configuration wires the UNet."""
    from ldmkit.config import load_config
    from ldmkit.wiring import describe_wiring

    print(f"ldmkit {__version__}\n\n== installed plugins ==")
    status = cmd_plugins(argparse.Namespace(json=False))
    config_path = Path(args.config) if args.config else _repo_root() / DEFAULT_DEMO_CONFIG
    print(f"\n== a composed configuration: {config_path} ==")
    desc = describe_wiring(load_config(config_path))
    _print_wiring(desc)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "wiring.json").write_text(json.dumps(desc, indent=2) + "\n")
        print(f"\nwrote {out / 'wiring.json'}")
    args.gallery = []  # each step adds what it drew (GalleryEntry); written as index.html at the end
    for hook in _QUICKSTART_STEPS:
        status = hook(args) or status
    if args.out and args.gallery:
        from ldmkit.gallery import write_gallery

        page = write_gallery(Path(args.out) / "index.html", args.gallery, title=f"ldmkit {__version__}: quickstart",
                             intro="Every zoo model on held-out inputs, with the numbers its card records and the "
                                   "commands that reproduce them. Written by `ldmkit quickstart`.")
        print(f"\n== gallery ==\nwrote {page} (open it in a browser: every picture above, its numbers and commands)")
    return status


def _gallery_add(args: argparse.Namespace, image: Path, title: str, caption: str, zoo_name: str | None = None,
                 commands: list[str] | None = None) -> None:
    """Record a picture the quickstart wrote, with its zoo card's numbers and commands when it has one."""
    from ldmkit.gallery import GalleryEntry
    from ldmkit.zoo import card, card_evals

    info = card(zoo_name) if zoo_name else {}
    evals = card_evals(info)  # a composed model has one per suite
    metrics = {(f"{ev.get('suite')}: {k}" if len(evals) > 1 else k): v for _, ev in evals
               for k, v in ev.get("metrics", {}).items() if isinstance(v, (int, float))}
    suites = ", ".join(str(ev.get("suite")) for _, ev in evals)
    note = f"ldmkit eval, suite{'s' if len(evals) > 1 else ''} {suites}, n = {evals[0][1].get('n')}" if metrics else ""
    cmds = list(commands or [])
    cmds += [c for c in (*(command for command, _ in evals), info.get("train_command")) if c]
    if hasattr(args, "gallery"):
        args.gallery.append(GalleryEntry(title, image.name, caption, info.get("description", ""), metrics, note, cmds))


def _quickstart_data(args: argparse.Namespace) -> None:
    """A preview of the shapes world with every modality's ground truth drawn on."""
    from ldmkit.data.preview import preview_grid
    from ldmkit.data.shapes import ShapesWorld

    out = Path(args.out)
    world = ShapesWorld(split="eval", size=32, seed=0)
    path = out / "shapes-preview.png"
    preview_grid([world[i] for i in range(8)], cols=4, scale=4).save(path)
    print(f"\n== data: the shapes world (every conditioner's ground truth at once) ==\nwrote {path}")
    _gallery_add(args, path, "data: the shapes world",
                 "eight held-out scenes with every conditioner's ground truth drawn on (label, caption, boxes, "
                 "class map, low-res image, inpainting mask)", commands=["ldmkit data preview shapes --out shapes.png"])


def _quickstart_autoencoders(args: argparse.Namespace) -> None:
    """Reconstructions of held-out scenes by every zoo autoencoder, side by side, with their PSNR."""
    import numpy as np

    from ldmkit.api import load
    from ldmkit.data.preview import image_rows
    from ldmkit.data.shapes import ShapesWorld
    from ldmkit.metrics.image import psnr
    from ldmkit.models.ldm import images_to_tensor, tensor_to_images

    names = _zoo_names("autoencoder", "first stage: zoo autoencoders on held-out scenes")
    if not names:
        return
    world = ShapesWorld(split="eval", size=32, seed=0)
    originals = np.stack([world[i].image for i in range(8)])
    rows = [originals]
    for name in names:
        model = load(f"zoo:{name}")
        with torch_inference():
            rec = tensor_to_images(model.reconstruct(images_to_tensor(originals)))
        rows.append(rec)
        z = model.latent_shape(32, 32)
        print(f"zoo:{name:<16} 32x32x3 -> latent {z[1]}x{z[2]}x{z[0]}   PSNR on these 8: {psnr(rec, originals):.1f} dB")
    path = Path(args.out) / "reconstructions.png"
    image_rows(rows, ["original", *names], scale=4).save(path)
    print(f"wrote {path} (top row: originals; then one row per autoencoder: {', '.join(names)})")
    _gallery_add(args, path, "first stage: the zoo autoencoders",
                 f"top row: eight held-out scenes; then one row per autoencoder ({', '.join(names)})",
                 commands=[f"ldmkit eval zoo:{n} --suite recon-shapes --n 256 --json" for n in names])


def _quickstart_diffusion(args: argparse.Namespace) -> None:
    """Samples from every zoo diffusion model: one row per class for class-conditional ones."""
    import time

    import numpy as np

    from ldmkit.api import load
    from ldmkit.data.preview import image_rows
    from ldmkit.data.shapes import NUM_CLASSES, class_name
    from ldmkit.models.ldm import tensor_to_images
    from ldmkit.zoo import card, card_evals

    for name in _zoo_names("latent_diffusion", "latent diffusion: samples from the zoo (DDIM, 50 steps)"):
        model = load(f"zoo:{name}")
        keys = model.stack.accepted_keys()
        start = time.perf_counter()
        if set(keys) == {"label"}:  # class-conditional: one row per class, at the model's default guidance
            per_class = 4
            labels = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
            images = tensor_to_images(model.sample({"label": labels}, sampler="ddim", steps=50, seed=0))
            rows = [images[c * per_class:(c + 1) * per_class] for c in range(NUM_CLASSES)]
            row_labels = [f"{c:2d} {' '.join(reversed(class_name(c)))}" for c in range(NUM_CLASSES)]
            what = f"label=0..{NUM_CLASSES - 1}, guidance {model.config.guidance}"
        elif keys:  # other (or several) conditions: held-out scenes' conditions, the inputs drawn beside the samples
            rows, row_labels, what = _inputs_beside_samples(model, sorted(keys), per_scene=4, data=_recipe_data(name))
            images = np.concatenate([r[-4:] for r in rows])  # the samples (each row starts with its inputs)
        else:
            images = tensor_to_images(model.sample(None, n=32, sampler="ddim", steps=50, seed=0))
            rows, row_labels, what = [images[:16], images[16:]], None, "unconditional"
        path = Path(args.out) / f"samples-{name}.png"
        image_rows(rows, row_labels, scale=3).save(path)
        evals = card_evals(card(name))  # a composed model has one per suite
        shown = "; ".join((f"{ev.get('suite')}: " if len(evals) > 1 else "")
                          + ", ".join(f"{k} {v:.3f}" for k, v in ev.get("metrics", {}).items() if isinstance(v, float))
                          for _, ev in evals)
        print(f"zoo:{name:<16} {what}: {len(images)} images in {time.perf_counter() - start:.1f} s -> {path}"
              + (f"\n{'':21}its card's eval: {shown}" if shown else ""))
        _gallery_add(args, path, f"zoo:{name}", f"{what} (DDIM 50 steps, the model's default guidance, seed 0)", name)


def _inputs_beside_samples(model: Any, keys: list[str], scenes: int = 6, per_scene: int = 4, size: int | None = None,
                           data: str = "shapes"):
    """Rows ``[input picture, the scene's own image, per_scene samples]`` for held-out eval scenes.

    ``size`` (default: the training size) draws the scenes, and samples, at another size: larger ones
    sample convolutionally (paper §4.3.2). ``data`` names the data set whose ``eval`` split gives the
    conditions (a zoo model's recipe says which it was trained on: :func:`_recipe_data`)."""
    import numpy as np

    from ldmkit.data import load_dataset
    from ldmkit.data.preview import condition_panel
    from ldmkit.fields import sample_value
    from ldmkit.models.ldm import tensor_to_images

    size = size or model.config.image_size
    world = load_dataset(data, split="eval", size=size, seed=0)
    step = max(1, len(world) // scenes) if data != "shapes" else 1  # spread over a small eval set (emoji)
    chosen = [world[i * step] for i in range(min(scenes, len(world)))]
    values = {k: [sample_value(s, k) for s in chosen for _ in range(per_scene)] for k in keys}
    images = tensor_to_images(model.sample(values, sampler="ddim", steps=50, seed=0, height=size, width=size))
    panel_hw = images.shape[1:3]
    pictured = [k for k in keys if k not in ("label", "caption")]
    rows, labels = [], []
    for i, s in enumerate(chosen):
        panels = [condition_panel(sample_value(s, k), k, panel_hw) for k in pictured]
        rows.append(np.stack([*panels, s.image, *images[i * per_scene:(i + 1) * per_scene]]))
        labels.append(s.caption if "caption" in keys else f"eval scene {i}")
    scenes = len(chosen)
    inputs = ", ".join(pictured) + (" (drawn), " if pictured else "") + "the scene, then samples"
    return rows, labels, f"{', '.join(keys)} of {scenes} held-out scenes; columns: {inputs}"


def _recipe_data(name: str) -> str:
    """The data set a zoo model was trained on (its recipe's ``data.name``; shapes when it does not say)."""
    import yaml

    from ldmkit.zoo import ZOO_DIR

    recipe = ZOO_DIR / f"{name}.yaml"
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data", {}) if recipe.is_file() else {}
    return str(data.get("name", "shapes"))


def _zoo_names(kind: str, title: str) -> list[str]:
    """Print a quickstart section title; the zoo models of ``kind`` (a note when there are none)."""
    from ldmkit.api import model_kind
    from ldmkit.zoo import list_zoo

    print(f"\n== {title} ==")
    names = [n for n in list_zoo() if model_kind(f"zoo:{n}") == kind]
    if not names:
        print(f"(no {kind.replace('_', ' ')} model in the zoo yet)")
    return names


def torch_inference():
    import torch

    return torch.inference_mode()


#: The quickstart's later steps: data, then what each stage adds (autoencoders, diffusion).
_QUICKSTART_STEPS: list[Callable[[argparse.Namespace], int | None]] = [
    _quickstart_data, _quickstart_autoencoders, _quickstart_diffusion]


# -- data -------------------------------------------------------------------------------------
def _open_dataset(args: argparse.Namespace):
    from ldmkit.data import load_dataset

    kw = {"skip_invalid": True} if getattr(args, "skip_invalid", False) else {}
    data = load_dataset(args.name, split=args.split, size=args.size, seed=args.seed, **kw)
    skipped = getattr(data, "skipped", 0)
    if skipped:
        print(f"skipped {skipped} invalid manifest line(s)", file=sys.stderr)
    return data


def _take(data, n: int) -> list:
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    return [data[i] for i in range(min(n, len(data)))]


def cmd_data_list(args: argparse.Namespace) -> int:
    from ldmkit.data import DATASETS

    for name, what in DATASETS.items():
        print(f"{name:<8} {what}")
    print("folder:PATH  a folder of images;  manifest:PATH or PATH.jsonl  a JSONL manifest (docs/data.md)")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from ldmkit.data.preview import preview_grid

    out = Path(args.out)
    if out.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp", ".bmp"}:
        hint = f"; it is a directory: try {out / 'preview.png'}" if out.is_dir() else ""
        raise ValueError(f"--out {out} must be an image file name ending in .png, .jpg, .jpeg, .webp or .bmp{hint}")
    samples = _take(_open_dataset(args), args.n)
    grid = preview_grid(samples, cols=args.cols, scale=args.scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(samples)} samples, {grid.width}x{grid.height})")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    from ldmkit.data.preview import export

    samples = _take(_open_dataset(args), args.n)
    manifest = export(samples, args.out, overwrite=args.overwrite)
    print(f"wrote {len(samples)} samples and {manifest}")
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="shapes, emoji, digits, photos, folder:PATH, manifest:PATH or PATH.jsonl")
    p.add_argument("--split", default="train", help="train (default), eval, ...; see docs/data.md")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid manifest lines (and count them)")


# -- eval -------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from ldmkit.evaluate import SUITES, run_suite, suite_size

    if args.suite not in SUITES:
        raise ValueError(f"unknown suite {args.suite!r}; allowed: {', '.join(SUITES)}")
    if args.reference and args.shuffled:
        raise ValueError("--reference and --shuffled exclude each other")
    _sampling_options(args)
    if args.model is None and not (args.reference or args.shuffled):
        raise ValueError("give a MODEL to evaluate, or --reference (the ceiling) / --shuffled (the floor)")
    if args.model is not None and (args.reference or args.shuffled):
        raise ValueError("--reference and --shuffled score ground truth; do not give a MODEL with them")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    generate = None
    mode = "reference" if args.reference else "shuffled" if args.shuffled else "model"
    if args.model is not None:
        generate = _model_generator(args)
    metrics = run_suite(args.suite, n=args.n, seed=args.seed, mode=mode, generate=generate, size=args.size,
                        progress=not args.json)
    if generate is not None and hasattr(generate, "extra_metrics"):
        metrics.update(generate.extra_metrics())
    n = suite_size(args.suite, args.n, args.seed, args.size)  # what was scored (recon-photos caps n)
    result = {"suite": args.suite, "model": args.model, "n": n, "metrics": metrics}
    if generate is not None and getattr(generate, "keys", None) is not None:
        result["keys"] = generate.keys  # what the model was given
    if generate is not None and hasattr(generate, "options"):
        changed = {k: v for k, v in generate.options.items() if v != SAMPLING_DEFAULTS[k]}
        if changed:
            result["options"] = changed  # non-default sampling options, so the JSON says what was measured
    if args.json:
        print(json.dumps(result))
    else:
        print(f"suite {args.suite}  model {args.model or mode}  n={n}")
        for k, v in metrics.items():
            print(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}")
    return 0


#: Sampling options shared by ``ldmkit sample`` and ``ldmkit eval``, with their defaults (as model.sample's).
SAMPLING_DEFAULTS = {"keep_known": True, "paste": True, "precision": "fp32", "prepack": False, "compile": False}


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """--no-keep-known, --paste/--no-paste, --precision, --prepack and --compile (defaults: :data:`SAMPLING_DEFAULTS`)."""
    p.add_argument("--no-keep-known", dest="keep_known", action="store_false",
                   help="inpainting: do not hold the known region's latents during sampling (default: held)")
    p.add_argument("--paste", action=argparse.BooleanOptionalAction, default=SAMPLING_DEFAULTS["paste"],
                   help="inpainting: paste the known pixels over the decoded images (default: on; --no-paste: the "
                        "model's own pixels everywhere)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=SAMPLING_DEFAULTS["precision"],
                   help="bf16: the UNet under bfloat16 autocast, ~2x faster on CPUs with native bf16 at large "
                        "batches, slightly different images (default fp32)")
    p.add_argument("--prepack", action="store_true", default=SAMPLING_DEFAULTS["prepack"],
                   help="CPU: run the UNet channels-last on weights reordered once for oneDNN, with fused residual "
                        "adds and the context's keys/values kept across steps; faster, images equal up to float "
                        "rounding (default off)")
    p.add_argument("--compile", action="store_true", default=SAMPLING_DEFAULTS["compile"],
                   help="CPU: run the UNet through torch.compile with its weights frozen; the fastest float32 step at "
                        "small batches, after a compile of ~40 s at the first step that a single run rarely repays "
                        "(docs/performance.md); images equal up to float rounding; not with --prepack (default off)")


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options as ``model.sample`` takes them (checked before any model is loaded)."""
    if args.compile and args.prepack:
        raise ValueError("--compile and --prepack are alternatives (both speed up the UNet step on a CPU); give one")
    return {k: getattr(args, k) for k in SAMPLING_DEFAULTS}


def _model_generator(args: argparse.Namespace):
    """The function that turns held-out conditions into images for ``args.model``."""
    from ldmkit.api import diffusion_generator, load, model_kind, recon_generator

    kind = model_kind(args.model)
    recon = args.suite.startswith("recon-")
    if kind == "autoencoder" and not recon:
        raise ValueError(f"{args.model} is an autoencoder: evaluate it with --suite recon-shapes or recon-photos")
    if kind == "latent_diffusion" and recon:
        raise ValueError(f"{args.model} is a diffusion model: recon-* suites are for autoencoders")
    model = load(args.model)
    if kind == "autoencoder":
        return recon_generator(model)
    from ldmkit.evaluate import suite_keys

    keys = args.keys  # else a composed model gets the suite's condition only
    if keys is None:
        keys = suite_keys(args.suite, model.stack.accepted_keys())
    return diffusion_generator(model, sampler=args.sampler, steps=args.steps, guidance=parse_guidance(args.guidance),
                               seed=args.seed, unconditional=args.suite == "shapes-uncond",
                               options=_sampling_options(args),
                               keys=None if args.suite == "shapes-uncond" else keys)


def parse_guidance(items: Sequence[str] | None) -> float | dict[str, float] | None:
    """``["3"]`` → 3.0 (joint); ``["class=3", "text=5"]`` → per-conditioner scales; none → the model's default."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return _number(items[0], "--guidance")
    scales = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--guidance {item!r}: use one SCALE, or NAME=SCALE per conditioner")
        scales[name] = _number(value, f"--guidance {name}")
    return scales


def _number(text: str, what: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number, got {text!r}")
    return value


# -- train ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Dispatch on the config: an autoencoder recipe (model.kind kl|vq) or a latent diffusion one."""
    from ldmkit.config import ConfigError, load_config, load_yaml

    data = load_yaml(args.config)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{args.config}: a training config needs a 'model:' mapping (see configs/)")
    overrides = {}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    if args.steps is not None:  # 0 is an error (validated below), not "the recipe's steps"
        overrides["steps"] = args.steps
    data = {**data, **overrides}
    if data["model"].get("kind") in ("kl", "vq"):
        from ldmkit.train.autoencoder import AutoencoderTrainConfig, train_autoencoder

        cfg = load_config(data, AutoencoderTrainConfig)
        path = train_autoencoder(cfg, resume=args.resume, progress=not args.quiet)
    else:
        from ldmkit.train.diffusion import DiffusionTrainConfig, train_diffusion

        cfg = load_config(data, DiffusionTrainConfig)
        path = train_diffusion(cfg, resume=args.resume, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A model file from a diffusion training checkpoint (stop a run early and keep its EMA weights)."""
    from ldmkit.train.diffusion import export_model

    if Path(args.out).exists() and Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--out {args.out} is the checkpoint being exported; write the model file elsewhere")
    path = export_model(args.checkpoint, args.out, use_ema=not args.raw, guidance=parse_guidance(args.guidance),
                        dtype=args.dtype, bundle_autoencoder=not args.reference_autoencoder)
    print(f"wrote {path}")
    return 0


# -- sample -----------------------------------------------------------------------------------
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _text_fields() -> set[str]:
    """Fields whose value is a plain string: taken verbatim from ``--cond`` (never parsed as JSON)."""
    from ldmkit.registry import get_registry

    return {"caption"} | {name for name, f in get_registry().fields.items() if f.value_type is str}


def _parse_value(text: str, key: str = "value") -> Any:
    """``@file`` loads a file (image → array, ``.json`` → object); JSON literals parse; anything else is a string."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ValueError(f"{key}={text}: no such file")
        suffix = path.suffix.lower()
        if suffix in _IMAGE_SUFFIXES:
            import numpy as np
            from PIL import Image, UnidentifiedImageError

            try:
                return np.asarray(Image.open(path))
            except (UnidentifiedImageError, OSError) as exc:
                raise ValueError(f"{key}={text}: not a readable image ({exc})") from None
        if suffix == ".npy":  # an array (a class map, say); object arrays would need pickle: refused
            import numpy as np

            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise ValueError(f"{key}={text}: not a readable .npy array without pickle ({exc})") from None
        if suffix != ".json":
            raise ValueError(
                f"{key}={text}: files must be images ({', '.join(sorted(_IMAGE_SUFFIXES))}), .npy or .json, "
                f"not {suffix or 'no suffix'!r}"
            )
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{key}={text}: not valid JSON ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


#: ``ldmkit sample`` samples and writes this many images at a time (so --n is bounded by disk, not memory).
SAMPLE_CHUNK = 64


def _check_sample_args(args: argparse.Namespace) -> None:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be a positive number of pixels, got {value}")
    if not 1 <= args.batch <= 4096:
        raise ValueError(f"--batch must be in 1..4096 images, got {args.batch}")
    if not 0 <= args.seed < 2**62:
        raise ValueError(f"--seed must be in 0..2**62-1, got {args.seed}")
    _sampling_options(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the PNGs, JSON and grid.png")
    if out.is_dir() and not args.overwrite:
        earlier = sorted(p.name for p in out.iterdir() if p.name == "grid.png" or p.name[:4].isdigit())
        if earlier:
            raise FileExistsError(f"--out {out} already holds earlier samples ({', '.join(earlier[:3])}"
                                  f"{', ...' if len(earlier) > 3 else ''}); pass --overwrite or choose another directory")


def cmd_sample(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    from ldmkit.api import load, model_kind
    from ldmkit.data.preview import image_rows
    from ldmkit.models.ldm import tensor_to_images
    from ldmkit.types import ConditionInputError

    _check_sample_args(args)
    if model_kind(args.model) != "latent_diffusion":
        raise ValueError(f"{args.model} is not a diffusion model; `ldmkit sample` needs one")
    model = load(args.model)
    f = model.config.downsample_factor
    height, width = args.height or model.config.image_size, args.width or model.config.image_size
    multiple = f * model.unet.min_size_multiple
    for flag, value in (("--height", height), ("--width", width)):
        if value % multiple:
            raise ValueError(f"{flag} must be a multiple of {multiple} for this model, got {value}")
    accepted = sorted(model.stack.accepted_keys())
    raw: dict[str, dict[str, str]] = {"--cond": {}, "--negative": {}}
    text_fields = _text_fields()  # caption=12 is the caption "12", not the number 12
    recorded: dict[str, dict[str, Any]] = {}  # for the JSON: values as given, files by their @path
    values: dict[str, dict[str, Any]] = {}
    for flag, items in (("--cond", args.cond), ("--negative", args.negative)):
        for item in items or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{flag} {item!r}: use KEY=VALUE; this model accepts: {', '.join(accepted) or '(none)'}")
            if key in raw[flag]:
                raise ValueError(f"{flag} {key} given twice")
            raw[flag][key] = value
        values[flag] = {k: v if k in text_fields and not v.startswith("@") else _parse_value(v, f"{flag} {k}")
                        for k, v in raw[flag].items()}
        recorded[flag] = {k: raw[flag][k] if raw[flag][k].startswith("@") else v for k, v in values[flag].items()}
        try:
            batch = model.check_conditions({k: [v] for k, v in values[flag].items()})
            with model.stack.at_latent_size(height // f, width // f):
                for key, column in batch.items():  # validate the values before any sampling, at the asked size
                    for name in model.stack.accepted_keys()[key]:
                        model.stack.conditioners[name].prepare(column)
        except ConditionInputError as exc:  # one value for every image: "(sample 0)" would point nowhere
            given = raw[flag].get(exc.field)
            shown = given if given is None or len(given) <= 40 else given[:37] + "..."
            source = f"{flag} {exc.field}={shown}" if given is not None else flag
            raise ConditionInputError(exc.field, exc.problem, exc.allowed, source=source) from None
    guidance = parse_guidance(args.guidance)
    if guidance is None:  # the model's default, written out so that the JSON reproduces the image
        guidance = model.config.guidance
    chunk = args.batch
    model.check_memory(min(args.n, chunk), height, width, guided=bool(model.stack.names))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid: list = []
    chunks = range(0, args.n, chunk)
    if args.compile:
        print("compiling the UNet at the first step (torch.compile: tens of seconds on a CPU, again for a last "
              "batch of another size)", file=sys.stderr)
    for k, start in enumerate(tqdm(chunks, desc="sampling", unit="batch", disable=len(chunks) < 2)):
        m = min(chunk, args.n - start)
        seed = args.seed + 1000 * k  # the first chunk is what one call with --n <= --batch gives
        cond = {key: [v] * m for key, v in values["--cond"].items()}
        neg = {key: [v] * m for key, v in values["--negative"].items()}
        images = tensor_to_images(model.sample(cond or None, n=None if cond else m, guidance=guidance,
                                               negative=neg or None, sampler=args.sampler, steps=args.steps,
                                               seed=seed, height=args.height, width=args.width,
                                               **_sampling_options(args)))
        for j, im in enumerate(images):
            i = start + j
            Image.fromarray(im).save(out / f"{i:04d}.png")
            record = {"model": args.model, "index": i, "n": args.n, "seed": args.seed, "batch_seed": seed,
                      "batch": chunk, "precision": args.precision, "prepack": args.prepack,
                      "compile": args.compile, "keep_known": args.keep_known, "paste": args.paste,
                      "sampler": args.sampler, "steps": args.steps, "guidance": guidance, "height": args.height,
                      "width": args.width, "conditions": recorded["--cond"], "negative": recorded["--negative"],
                      "command": "ldmkit " + " ".join(sys.argv[1:])}
            (out / f"{i:04d}.json").write_text(json.dumps(record, indent=2) + "\n")
        grid.extend(images[: max(0, 64 - len(grid))])
    h, w = grid[0].shape[:2]
    image_rows([grid[i:i + 8] for i in range(0, len(grid), 8)], scale=min(32, max(1, 256 // max(h, w)))).save(out / "grid.png")
    shown = "" if args.n <= 64 else " (the first 64)"
    print(f"wrote {args.n} images, their JSON and {out / 'grid.png'}{shown}")
    return 0


# -- zoo --------------------------------------------------------------------------------------
def cmd_zoo(args: argparse.Namespace) -> int:
    from ldmkit.zoo import card, card_evals, list_zoo

    names = list_zoo()
    if args.json:
        print(json.dumps({n: card(n) for n in names}, indent=2))
        return 0
    if not names:
        print("the zoo is empty")
    for name in names:
        c = card(name)
        facts = [f"{c['file_mb']} MB" if c.get("file_mb") else None,
                 f"{c['parameters'] / 1e6:.2f} M parameters" if c.get("parameters") else None,
                 f"{c['steps']:,} steps" if c.get("steps") else None,
                 f"{c['train_minutes']} min on a CPU" if c.get("train_minutes") else None]
        print(f"zoo:{name}  ({', '.join(f for f in facts if f)})")
        print(f"  {c.get('description', '')}")
        evals = card_evals(c)  # a composed model has one per suite
        for _, result in evals:
            if result.get("metrics"):
                shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result["metrics"].items())
                print(f"  {result.get('suite', 'eval')} (n={result.get('n')}): {shown}")
        for command, _ in evals:
            if command:
                print(f"  reproduce: {command}")
    return 0


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldmkit", description="Latent diffusion models where every conditioning modality is a plugin."
    )
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed plugins, their status and conditioners")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("schema", help="write or check the JSON Schemas of ldmkit's configs")
    p.add_argument("--out", default="schemas", help="directory (default: schemas)")
    p.add_argument("--check", action="store_true", help="exit 1 if the files in --out are stale")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("wiring", help="show how a model config's conditioners wire the UNet")
    p.add_argument("config", help="a latent diffusion YAML config (or a training recipe with a model: section)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wiring)

    p = sub.add_parser("quickstart", help="the tour: plugins, a composed model's wiring, and what later stages add")
    p.add_argument("--config", default=None, help=f"model config to wire (default: {DEFAULT_DEMO_CONFIG})")
    p.add_argument("--out", default="out/quickstart", help="where to write outputs (default: out/quickstart)")
    p.set_defaults(func=cmd_quickstart)

    data = sub.add_parser("data", help="data sets: list, preview, export").add_subparsers(dest="data_command", metavar="ACTION")
    p = data.add_parser("list", help="the built-in data sets")
    p.set_defaults(func=cmd_data_list)
    p = data.add_parser("preview", help="a labelled grid of samples with their conditions drawn on")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling (default 4)")
    p.set_defaults(func=cmd_data_preview)
    p = data.add_parser("export", help="write images, masks, maps and a manifest.jsonl that loads back")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty directory")
    p.set_defaults(func=cmd_data_export)

    p = sub.add_parser("eval", help="score a model (or the ground truth) with a metric suite; JSON on stdout")
    p.add_argument("model", nargs="?", default=None, help="checkpoint path or zoo:NAME")
    p.add_argument("--suite", required=True, help="shapes-class, shapes-caption, shapes-layout, shapes-semantic, "
                   "shapes-sr, shapes-inpaint, shapes-uncond, recon-shapes, recon-photos, emoji-text")
    p.add_argument("--n", type=int, default=200, help="number of held-out conditions (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="image size (default 32)")
    p.add_argument("--reference", action="store_true", help="score the ground-truth images (the ceiling)")
    p.add_argument("--shuffled", action="store_true", help="score each condition against another scene's image (the floor)")
    p.add_argument("--sampler", default="ddim", help="ddpm, ddim (default), plms, dpmpp_2m")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--guidance", nargs="*", default=None, help="SCALE, or NAME=SCALE per conditioner (default: the model's config.guidance)")
    _add_sampling_options(p)
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="condition keys given to the model (default: the suite's own, e.g. label for shapes-class; "
                        "a composed model's other conditioners get their nulls). E.g. --keys caption boxes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train an autoencoder or a latent diffusion model from a YAML recipe")
    p.add_argument("config", help="YAML recipe (configs/autoencoder/*.yaml, configs/ldm/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.safetensors")
    p.add_argument("--out-dir", default=None, help="override the recipe's out_dir")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a model file from a diffusion training checkpoint (last.safetensors)")
    p.add_argument("checkpoint", help="RUN_DIR/last.safetensors")
    p.add_argument("--out", required=True, help="the model file to write")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    p.add_argument("--dtype", choices=["float32", "float16"], default=None, help="stored precision (default: the recipe's save_dtype)")
    p.add_argument("--guidance", nargs="*", default=None, help="store this default guidance: SCALE or NAME=SCALE ...")
    p.add_argument("--reference-autoencoder", action="store_true",
                   help="store a reference to the recipe's zoo autoencoder (name + digest) instead of its weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "sample", help="generate images from a diffusion model",
        description="Generate images from a diffusion model. Conditions are given per field with --cond KEY=VALUE "
                    "(repeatable; the same value for every image). KEY is a field the model reads (built in: label, "
                    "caption, boxes, segmentation, lowres, mask; plugins add their own, see `ldmkit plugins`). VALUE is "
                    "parsed as JSON when it parses (label=3, palette='[\"red\", [40, 70, 220]]'), else taken as a "
                    "string (caption='a red circle'); @path reads a file: an image (.png .jpg .jpeg .bmp .webp) as an "
                    "array, a .npy file as its array (no pickle), a .json file as its value.",
        epilog="example: ldmkit sample zoo:shapes-class --cond label=14 --n 8 --out samples/")
    p.add_argument("model", help="checkpoint path or zoo:NAME")
    p.add_argument("--cond", action="append", metavar="KEY=VALUE",
                   help="a condition for every image: VALUE is JSON if it parses, else a string; @path reads an image, .npy or .json file")
    p.add_argument("--negative", action="append", metavar="KEY=VALUE",
                   help="a negative condition: used instead of the null in guidance's baseline (steer away from it)")
    p.add_argument("--guidance", nargs="*", default=None, help="SCALE, or NAME=SCALE per conditioner (default: the model's config.guidance)")
    p.add_argument("--sampler", default="ddim", help="ddpm, ddim (default), plms, dpmpp_2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--height", type=int, default=None, help="larger than training size: convolutional sampling")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", required=True, help="directory for PNGs, JSON and grid.png")
    p.add_argument("--overwrite", action="store_true", help="replace earlier samples in --out")
    _add_sampling_options(p)
    p.add_argument("--batch", type=int, default=SAMPLE_CHUNK,
                   help=f"images sampled (and written) at a time (default {SAMPLE_CHUNK}); larger is faster per image "
                        "on a CPU while memory allows; the images depend on --seed and --batch")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("zoo", help="list the shipped models with their eval results")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_zoo)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: Other modules add subcommands here: functions taking the subparsers object.
_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    from pydantic import ValidationError

    from ldmkit.config import ConfigError
    from ldmkit.plugins import PluginError
    from ldmkit.registry import ConditionerConflictError, SpecError, UnknownConditionerError
    from ldmkit.train.checkpoint import CheckpointError
    from ldmkit.types import ConditionInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handlers below
        return status
    except CheckpointError as exc:
        print(f"ldmkit: error: {exc}", file=sys.stderr)
        return 2
    except PluginError as exc:
        print(f"ldmkit: error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, ConditionInputError, SpecError, ConditionerConflictError, UnknownConditionerError) as exc:
        print(f"ldmkit: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        from ldmkit.config import format_validation_error

        print(f"ldmkit: error: invalid {exc.title}:\n{format_validation_error(exc, '  ')}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"ldmkit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ldmkit zoo | head -1`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, MemoryError) as exc:  # a path that cannot be written, a disk or memory limit
        what = str(exc) or type(exc).__name__
        print(f"ldmkit: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, and the traceback on request
        import os
        import traceback

        if os.environ.get("LDMKIT_DEBUG"):
            traceback.print_exc()
        print(f"ldmkit: internal error: {type(exc).__name__}: {str(exc)[:500]}\n(please report it; set "
              "LDMKIT_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
