"""A sheet of a conditional model's samples beside their inputs, at any size (docs/images).

Usage: python scripts/sample_sheet.py zoo:shapes-semantic OUT.png [--size 64] [--scenes 4] [--per-scene 3]

Held-out scenes (the eval split of the zoo model's training data; shapes otherwise) drawn at ``--size`` give the conditions (every key the model reads); larger than
the training size the model samples convolutionally (paper §4.3.2). Columns: the inputs (drawn), the
scene itself, then the samples (DDIM 50, the model's default guidance, seed 0).
"""

from __future__ import annotations

import argparse
import time

from ldmkit.api import load
from ldmkit.cli import _inputs_beside_samples, _recipe_data
from ldmkit.data.preview import image_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--size", type=int, default=None, help="scene and sample size (default: the training size)")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--per-scene", type=int, default=3)
    p.add_argument("--scale", type=int, default=3)
    args = p.parse_args()
    model = load(args.model)
    start = time.perf_counter()
    data = _recipe_data(args.model.removeprefix("zoo:")) if args.model.startswith("zoo:") else "shapes"
    rows, labels, what = _inputs_beside_samples(model, sorted(model.stack.accepted_keys()), args.scenes,
                                                args.per_scene, args.size, data=data)
    image_rows(rows, labels, scale=args.scale).save(args.out)
    print(f"{args.model} at {args.size or model.config.image_size}px: {what} ({time.perf_counter() - start:.1f} s) -> {args.out}")


if __name__ == "__main__":
    main()
