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
    from ldmkit.registry import ConditionerConflictError, get_registry

    pm = get_plugin_manager()
    conflict = None
    try:
        get_registry()  # calls every plugin's hook: fills in conditioners, marks spec violations failed
    except ConditionerConflictError as exc:
        conflict = str(exc)
    records = [r.as_dict() for r in sorted(pm.records.values(), key=lambda r: r.name)]
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        if not records:
            print("no ldmkit plugins installed (entry-point group 'ldmkit')")
        for r in records:
            conds = ", ".join(r["conditioners"]) or "-"
            print(f"{r['name']:<20} {r['version'] or '-':<10} {r['status']:<8} {conds}")
            if r["error"]:
                print(f"{'':<20} error: {r['error']}")
    if conflict:
        print(f"ldmkit: error: {conflict}", file=sys.stderr)
        return 1
    return 0


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

    desc = describe_wiring(load_config(args.config))
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
    for hook in _QUICKSTART_STEPS:
        status = hook(args) or status
    return status


#: Later stages (data, autoencoders, diffusion) append steps to the quickstart here.
_QUICKSTART_STEPS: list[Callable[[argparse.Namespace], int | None]] = []


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
    p.add_argument("config", help="a latent diffusion YAML config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_wiring)

    p = sub.add_parser("quickstart", help="the tour: plugins, a composed model's wiring, and what later stages add")
    p.add_argument("--config", default=None, help=f"model config to wire (default: {DEFAULT_DEMO_CONFIG})")
    p.add_argument("--out", default="out/quickstart", help="where to write outputs (default: out/quickstart)")
    p.set_defaults(func=cmd_quickstart)

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
    from ldmkit.types import ConditionInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
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
    except (FileNotFoundError, ValueError) as exc:
        print(f"ldmkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
