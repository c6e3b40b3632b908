"""Add a trained model to the zoo: copy its weights and recipe, run its eval, write its card.

Usage: python scripts/zoo_card.py NAME RUN_DIR RECIPE.yaml --suite SUITE [--suite SUITE2 ...] [--n N]
       --description "..." [--eval-args "--sampler ddim --steps 50"] [--continues] [--train-command "..."]
       python scripts/zoo_card.py NAME [NAME ...] --refresh-evals

``--refresh-evals`` re-runs the eval commands already on the named cards and replaces their results
(after a metric changes; nothing else on the card is touched).

The card (ldmkit/zoo/NAME.json) records the training command, steps, wall-clock minutes (from the
run's log), parameter count, file size, the machine, and the `ldmkit eval ... --json` result, which is
re-run here against the copied zoo file so the card describes exactly what ships. A model evaluated on
several suites (a composed one) gets the first as ``eval``/``eval_command`` and all of them under
``evals``/``eval_commands``. A model trained in stages, each from the last one's weights: ``--continues``
adds the current card's steps and minutes to this run's, ``--train-command`` gives every stage's command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from ldmkit.train.checkpoint import read_metadata, write_atomic

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "ldmkit" / "zoo"


def _train_minutes(log: list[dict], steps: int) -> float | None:
    """Wall-clock minutes of training up to ``steps``: from the records' times, else from sec_per_step."""
    timed = [r for r in log if "time" in r and r.get("step", 0) <= steps]
    if len(timed) >= 2 and "time" in log[0]:
        return (timed[-1]["time"] - log[0]["time"]) / 60
    total, prev = 0.0, 0
    for r in log:
        if "sec_per_step" in r and r["step"] <= steps:
            total += r["sec_per_step"] * (r["step"] - prev)
            prev = r["step"]
    return total / 60 if total else None


def shipped_parameters(weights: Path, logged: int | None) -> int | None:
    """Trainable parameters of the model as shipped: for a diffusion model counted on the file (a pruned text
    vocabulary has fewer embedding rows than the run trained with), else what the training log says."""
    from ldmkit.api import load, model_kind

    if model_kind(str(weights)) != "latent_diffusion":
        return logged
    return sum(p.numel() for p in load(str(weights)).trainable_parameters())


def run_eval(cmd: list[str]) -> dict:
    """``ldmkit eval ... --json`` (``cmd`` as written on a card), run with this interpreter; its JSON result."""
    res = subprocess.run([sys.executable, "-m", "ldmkit.cli", *cmd[1:]], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def refresh_evals(names: list[str]) -> None:
    for name in names:
        path = ZOO / f"{name}.json"
        card = json.loads(path.read_text())
        if card.get("evals"):
            card["evals"] = [run_eval(shlex.split(cmd)) for cmd in card["eval_commands"]]
            card["eval"] = card["evals"][0]
        elif card.get("eval_command"):
            card["eval"] = run_eval(shlex.split(card["eval_command"]))
        else:
            continue
        write_atomic(path, json.dumps(card, indent=2) + "\n")
        print(name, json.dumps([e["metrics"] for e in card.get("evals") or [card["eval"]]]), flush=True)


def main() -> None:
    if "--refresh-evals" in sys.argv[1:]:
        refresh_evals([a for a in sys.argv[1:] if a != "--refresh-evals"])
        return
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("run_dir", type=Path)
    p.add_argument("recipe", type=Path)
    p.add_argument("--suite", required=True, action="append", help="repeat for a model with several (first = main)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--description", required=True)
    p.add_argument("--eval-args", default="")
    p.add_argument("--weights", type=Path, default=None,
                   help="the model file (default RUN_DIR/model.safetensors; e.g. one written by `ldmkit export`)")
    p.add_argument("--continues", action="store_true",
                   help="this run continued the current zoo:NAME (init_from): its card's steps and minutes are added")
    p.add_argument("--train-command", default=None,
                   help="the whole reproduction, every stage (default: ldmkit train ldmkit/zoo/NAME.yaml)")
    p.add_argument("--trained-on", default=f"{platform.machine()} CPU, 2 cores shared with other work (times are upper bounds)",
                   help="where it was trained (default: this machine's CPU); for a staged model, say where each stage ran")
    args = p.parse_args()
    prior = json.loads((ZOO / f"{args.name}.json").read_text()) if args.continues else {}

    log = [json.loads(line) for line in (args.run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in log if r.get("event") == "start")
    weights = args.weights or args.run_dir / "model.safetensors"
    meta = read_metadata(weights)
    steps = int(meta.get("ldmkit.train_steps") or next(r for r in log if r.get("event") == "done")["step"])
    minutes = _train_minutes(log, steps)
    if prior:
        steps += int(prior["steps"])
        minutes = None if minutes is None or prior.get("train_minutes") is None else minutes + prior["train_minutes"]
    dst = ZOO / f"{args.name}.safetensors"
    write_atomic(dst, Path(weights).read_bytes())  # a killed run leaves the previous zoo file whole
    os.chmod(dst, 0o644)
    write_atomic(ZOO / f"{args.name}.yaml", Path(args.recipe).read_bytes())
    cmds, results = [], []
    for suite in args.suite:
        cmd = ["ldmkit", "eval", f"zoo:{args.name}", "--suite", suite, "--n", str(args.n), *shlex.split(args.eval_args), "--json"]
        cmds.append(" ".join(cmd))
        results.append(run_eval(cmd))
    card = {
        "name": args.name,
        "description": args.description,
        "recipe": f"ldmkit/zoo/{args.name}.yaml",
        "train_command": args.train_command or f"ldmkit train ldmkit/zoo/{args.name}.yaml",
        "steps": steps,
        "train_minutes": None if minutes is None else round(minutes, 1),
        "parameters": shipped_parameters(dst, start.get("params") or start.get("parameters")),
        "file_mb": round(dst.stat().st_size / 2**20, 2),
        "trained_on": args.trained_on,
        "eval_command": cmds[0],
        "eval": results[0],
        **({"eval_commands": cmds, "evals": results} if len(results) > 1 else {}),
    }
    write_atomic(ZOO / f"{args.name}.json", json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
