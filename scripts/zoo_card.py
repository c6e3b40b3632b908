"""Add a trained model to the zoo: copy its weights and recipe, run its eval, write its card.

Usage: python scripts/zoo_card.py NAME RUN_DIR RECIPE.yaml --suite SUITE [--n N] --description "..."
       [--eval-args "--sampler ddim --steps 50"]

The card (ldmkit/zoo/NAME.json) records the training command, steps, wall-clock minutes (from the
run's log), parameter count, file size, the machine, and the `ldmkit eval ... --json` result, which is
re-run here against the copied zoo file so the card describes exactly what ships.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "ldmkit" / "zoo"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("run_dir", type=Path)
    p.add_argument("recipe", type=Path)
    p.add_argument("--suite", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--description", required=True)
    p.add_argument("--eval-args", default="")
    args = p.parse_args()

    log = [json.loads(line) for line in (args.run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in log if r.get("event") == "start")
    done = next(r for r in log if r.get("event") == "done")
    minutes = (done["time"] - start["time"]) / 60 if "time" in done and "time" in start else None
    dst = ZOO / f"{args.name}.safetensors"
    shutil.copyfile(args.run_dir / "model.safetensors", dst)
    os.chmod(dst, 0o644)
    shutil.copyfile(args.recipe, ZOO / f"{args.name}.yaml")
    cmd = ["ldmkit", "eval", f"zoo:{args.name}", "--suite", args.suite, "--n", str(args.n), *shlex.split(args.eval_args), "--json"]
    res = subprocess.run([sys.executable, "-m", "ldmkit.cli", *cmd[1:]], capture_output=True, text=True, check=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    card = {
        "name": args.name,
        "description": args.description,
        "recipe": f"ldmkit/zoo/{args.name}.yaml",
        "train_command": f"ldmkit train ldmkit/zoo/{args.name}.yaml",
        "steps": done.get("step"),
        "train_minutes": None if minutes is None else round(minutes, 1),
        "parameters": start.get("params") or start.get("parameters"),
        "file_mb": round(dst.stat().st_size / 2**20, 2),
        "trained_on": f"{platform.machine()} CPU, 2 cores shared with other work (times are upper bounds)",
        "eval_command": " ".join(cmd),
        "eval": result,
    }
    (ZOO / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
