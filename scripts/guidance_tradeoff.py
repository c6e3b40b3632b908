"""Per-conditioner guidance at work: two conditions that disagree, traded against each other by their scales.

Usage: python scripts/guidance_tradeoff.py zoo:shapes-multi [--n 64] [--scales caption=4,boxes=0 ...]
                                           [--out docs/images/guidance-tradeoff.png] [--json FILE]

Image i is asked for the caption of held-out scene i and, at the same time, the layout boxes of scene
i + n, another scene, so the two conditions usually cannot both hold. Each ``--scales`` setting samples
the same n requests (DDIM 50, seed 0) with per-conditioner guidance (Liu et al. 2022, Eq. 9;
docs/composing.md), ``ε = ε(∅) + s_caption (ε(caption) − ε(∅)) + s_boxes (ε(boxes) − ε(∅))``, and scores
each condition against its own scene: ``caption_acc`` (the caption's objects, sizes and relation) and
``miou`` (the boxes). Raising one scale and lowering the other should move both numbers. The picture
has a row per setting over the first requests' samples, under a row of the boxes asked (drawn).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ldmkit.api import load
from ldmkit.data import load_dataset
from ldmkit.data.preview import condition_panel, image_rows
from ldmkit.metrics.shapes import caption_acc, layout_scores
from ldmkit.models.ldm import tensor_to_images

DEFAULT_SCALES = ("caption=4,boxes=0", "caption=3,boxes=1", "caption=2,boxes=2", "caption=1,boxes=3", "caption=0,boxes=4")


def parse_scales(text: str) -> dict[str, float]:
    """``"caption=3,boxes=1"`` -> ``{"caption": 3.0, "boxes": 1.0}`` (conditioner names or condition keys)."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--scales {text!r}: expected NAME=SCALE[,NAME=SCALE...], e.g. caption=3,boxes=1")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--scales {text!r}: {value!r} is not a number") from None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=64, help="requests per setting (default 64)")
    p.add_argument("--scales", nargs="+", default=list(DEFAULT_SCALES), help="settings, each NAME=S,NAME=S")
    p.add_argument("--columns", type=int, default=6, help="requests shown in the picture")
    p.add_argument("--out", default=None, help="PNG: a row per setting")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args()
    model = load(args.model)
    world = load_dataset("shapes", split="eval", size=model.config.image_size, seed=0)
    captioned = [world[i] for i in range(args.n)]
    boxed = [world[args.n + i] for i in range(args.n)]
    conditions = {"caption": [s.caption for s in captioned], "boxes": [s.boxes for s in boxed]}
    rows, labels, table = [], [], []
    k = min(args.columns, args.n)
    hw = (model.config.image_size, model.config.image_size)
    rows.append(np.stack([condition_panel(s.boxes, "boxes", hw) for s in boxed[:k]]))
    labels.append("layout asked (drawn)")
    print("captions asked, by column: " + " | ".join(s.caption for s in captioned[:k]), flush=True)
    for text in args.scales:
        scales = parse_scales(text)
        start = time.perf_counter()
        images = tensor_to_images(model.sample(conditions, guidance=scales, sampler="ddim", steps=50, seed=0))
        row = {"scales": scales, "caption_acc": caption_acc(captioned, images),
               "miou": layout_scores(boxed, images)["miou"], "seconds": round(time.perf_counter() - start, 1)}
        table.append(row)
        print(json.dumps(row), flush=True)
        rows.append(images[:k])
        labels.append(f"{text}: caption_acc {row['caption_acc']:.2f}, miou {row['miou']:.2f}")
    if args.out:
        image_rows(rows, labels, scale=3).save(args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
