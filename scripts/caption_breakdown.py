"""Where a text model's captions fail: `shapes-caption` split into the cases that make up caption_acc.

    python scripts/caption_breakdown.py MODEL [--n 100] [--per-caption 1] [--guidance 6 | NAME=S ...]
                                        [--precision bf16] [--json OUT] [--sheet OUT.png]

Samples the suite's n eval and n held-out captions (DDIM, ``--steps``), parses every image and counts, for
eval and for held-out captions separately:

- one-object captions whose object is drawn (colour and shape; ``..._at_size`` also the size word);
- two-object captions with both objects drawn, and with the held-out (first) / second object drawn;
- among two-object images with both objects drawn at the asked sizes, those whose relation holds — the
  relation rate on its own, apart from whether the objects were drawn;
- for a two-object caption whose first object is not drawn, what is there instead (among the recognisable
  objects that do not realize the second mention): its colour on one object and its shape on another
  (``first_missed_swapped``: the attributes went to different objects), only its colour on another shape
  (``first_missed_colour_kept``), only its shape in another colour (``first_missed_shape_kept``), or
  neither (``first_missed_neither``: left out, or drawn unrecognisably).

``--per-caption K`` draws K samples of every caption (seeds apart) and counts each: one sample per caption
moves the held-out two-object counts by about +-7 of 56 between models of one quality; with K samples the
spread of a count grows as sqrt(K) while the count grows as K, so a rate's spread shrinks as 1/sqrt(K). ``--reference`` scores the ground-truth images instead (the parser's ceiling: every count is full) and
``--shuffled`` another scene's (the floor). Prints a table; ``--json`` writes the counts; ``--sheet OUT.png``
draws the first eight held-out two-object captions: the scene, then four samples each.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ldmkit.data.base import Sample
from ldmkit.cli import parse_guidance
from ldmkit.evaluate import derangement, suite_conditions
from ldmkit.metrics.shapes import caption_request, mention_matches, mentions_hold, parse_scene


def breakdown(conditions: Sequence[Sample], images: Sequence[np.ndarray], n_eval: int,
              per_caption: int = 1) -> dict[str, dict[str, int]]:
    """Counts per group (``eval`` = the first ``n_eval`` conditions, ``heldout`` = the rest).

    ``images`` holds ``per_caption`` images of each condition in a row (condition i's are
    ``images[per_caption * i : per_caption * (i + 1)]``); each is counted.
    """
    if per_caption < 1:
        raise ValueError(f"per_caption must be >= 1, got {per_caption}")
    if len(images) != per_caption * len(conditions):
        raise ValueError(f"per_caption={per_caption}: expected {per_caption * len(conditions)} images "
                         f"({per_caption} per condition), got {len(images)}")
    out: dict[str, Counter] = {"eval": Counter(), "heldout": Counter()}
    for k, img in enumerate(images):
        i = k // per_caption
        cond = conditions[i]
        c = out["eval" if i < n_eval else "heldout"]
        want, relation = caption_request(cond)
        objs = parse_scene(img)

        def drawn(m: dict[str, Any], sized: bool) -> bool:
            return bool(mention_matches(m, objs, sized))

        if len(want) == 1:
            c["one_object"] += 1
            c["one_object_drawn"] += drawn(want[0], False)
            c["one_object_drawn_at_size"] += drawn(want[0], True)
            continue
        c["two_objects"] += 1
        first, second = drawn(want[0], False), drawn(want[1], False)
        c["first_drawn"] += first
        c["second_drawn"] += second
        c["both_drawn"] += first and second
        if not first:
            c["first_missed_" + _instead(want[0], want[1], objs)] += 1
        if drawn(want[0], True) and drawn(want[1], True):
            c["both_drawn_at_size"] += 1
            c["relation_holds_given_both"] += mentions_hold(want, relation, objs)
    return {k: dict(v) for k, v in out.items()}


def _sheet(out: Path, conditions: list[Sample], generate: Any, per: int = 4) -> None:
    """Rows: the caption's scene, then ``per`` samples of the caption (DDIM, as the counts)."""
    from ldmkit.data.preview import image_rows

    images = generate([c for c in conditions for _ in range(per)])
    rows = [np.stack([c.image, *images[per * i : per * (i + 1)]]) for i, c in enumerate(conditions)]
    image_rows(rows, [c.caption for c in conditions], scale=3).save(out)


def _instead(miss: dict[str, Any], other: dict[str, Any], objs: list) -> str:
    """What stands in for a mention that was not drawn: swapped, colour kept, shape kept, or neither."""
    realized = mention_matches(other, objs, False)  # the second mention's own objects are not stand-ins
    rest = [o for o in objs if o.recognisable and all(o is not r for r in realized)]
    colour = any(o.colour == miss["colour"] for o in rest)
    shape = any(o.shape == miss["shape"] for o in rest)
    return "swapped" if colour and shape else "colour_kept" if colour else "shape_kept" if shape else "neither"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="checkpoint path or zoo:NAME (omit with --reference / --shuffled)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--per-caption", type=int, default=1, metavar="K", help="samples per caption, each counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", nargs="*", default=None,
                   help="SCALE, or NAME=SCALE per conditioner (default: the model's config.guidance)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--shuffled", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sheet", type=Path, default=None, help="a PNG of held-out two-object captions and samples")
    args = p.parse_args(argv)
    if (args.model is None) == (not (args.reference or args.shuffled)) or (args.reference and args.shuffled):
        p.error("give a MODEL, or one of --reference / --shuffled without a model")
    if args.sheet and args.model is None:
        p.error("--sheet draws a model's samples: give a MODEL")
    try:
        guidance = parse_guidance(args.guidance)
    except ValueError as exc:
        p.error(str(exc))
    if args.per_caption < 1:
        p.error(f"--per-caption must be >= 1, got {args.per_caption}")
    conditions = suite_conditions("shapes-caption", args.n, args.seed)
    k = args.per_caption
    if args.reference:
        images = [c.image for c in conditions for _ in range(k)]
    elif args.shuffled:
        images = [conditions[j].image for j in derangement(len(conditions), args.seed) for _ in range(k)]
    else:
        from ldmkit.api import diffusion_generator, load

        generate = diffusion_generator(load(args.model), sampler="ddim", steps=args.steps, guidance=guidance,
                                       seed=args.seed, options={"precision": args.precision}, keys=["caption"])
        images = generate([c for c in conditions for _ in range(k)])
    counts = breakdown(conditions, images, args.n, k)
    for group, c in counts.items():
        print(f"{group}: one object drawn {c.get('one_object_drawn', 0)}/{c.get('one_object', 0)}; two objects: "
              f"both drawn {c.get('both_drawn', 0)}/{c.get('two_objects', 0)} (first {c.get('first_drawn', 0)}, "
              f"second {c.get('second_drawn', 0)}); relation holds {c.get('relation_holds_given_both', 0)}/"
              f"{c.get('both_drawn_at_size', 0)} of those drawn at the asked sizes; first missed: swapped "
              f"{c.get('first_missed_swapped', 0)}, colour kept {c.get('first_missed_colour_kept', 0)}, shape kept "
              f"{c.get('first_missed_shape_kept', 0)}, neither {c.get('first_missed_neither', 0)}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "n": args.n, "per_caption": k, "guidance": guidance,
                                         "counts": counts}, indent=2) + "\n")
    if args.sheet:  # after the counts, so a failed drawing loses nothing
        pairs = [c for c in conditions[args.n:] if len(caption_request(c)[0]) == 2][:8]
        if pairs:
            _sheet(args.sheet, pairs, generate)
        else:
            print(f"no held-out two-object caption among the first {args.n}; no sheet drawn", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
