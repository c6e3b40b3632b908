"""The model zoo: small checkpoints trained on this project's data, shipped inside the package.

Each entry ``NAME`` is three files in this folder:

- ``NAME.safetensors`` — the weights, with the validated config in the metadata;
- ``NAME.yaml`` — the recipe it was trained from (``ldmkit train NAME.yaml``);
- ``NAME.json`` — its card: what it is, the training command, time, steps, size, and its
  ``ldmkit eval`` result.

``zoo:NAME`` is accepted wherever a model reference is (``ldmkit.load``, the CLI).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["ZOO_DIR", "ZooError", "list_zoo", "resolve", "card", "card_evals"]

ZOO_DIR = Path(__file__).resolve().parent
PREFIX = "zoo:"


class ZooError(ValueError):
    """An unknown zoo name or a model reference that points nowhere."""


def list_zoo() -> list[str]:
    """Names of every shipped checkpoint."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.safetensors"))


def card(name: str) -> dict[str, Any]:
    """The card (``NAME.json``) of a zoo entry; empty if it has none."""
    path = ZOO_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def card_evals(info: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """A card's ``(eval command, eval result)`` pairs: one per suite for a composed model (``evals``),
    else the single ``eval``; empty when the card has no eval."""
    if info.get("evals"):
        return list(zip(info.get("eval_commands") or [None] * len(info["evals"]), info["evals"]))
    return [(info.get("eval_command"), info["eval"])] if info.get("eval") else []


def resolve(ref: str | Path) -> Path:
    """A checkpoint path from ``zoo:NAME`` or a path; a clear error when it does not exist."""
    text = str(ref)
    if text.startswith(PREFIX):
        name = text[len(PREFIX):]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
            raise ZooError(f"zoo:{name!r} is not a zoo name (letters, digits, '-', '_', '.'; no paths); "
                           f"available: {', '.join(list_zoo()) or '(none)'}")
        path = ZOO_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise ZooError(f"no zoo model {name!r}; available: {', '.join(list_zoo()) or '(none)'}")
        return path
    path = Path(text)
    if not path.is_file():
        hint = f" (did you mean zoo:{text}?)" if text in list_zoo() else ""
        raise ZooError(f"model {text!r} is not a file or a zoo:NAME reference{hint}")
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        raise ZooError(
            f"{path} is a pickle-based checkpoint; ldmkit never unpickles files. Convert it to safetensors first."
        )
    return path
