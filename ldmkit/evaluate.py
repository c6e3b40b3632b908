"""Evaluation suites: draw held-out conditions, get images for them, score them.

Each suite measures one conditioning modality (or realism, or reconstruction) with metrics computed by
comparing what was asked with what the scene parser (:mod:`ldmkit.metrics.shapes`) finds in the image.
Three modes give the images:

- ``reference``: each condition's own ground-truth image, i.e. the ceiling a perfect model reaches;
- ``shuffled``: the ground-truth image of a *different* condition (a seeded derangement), i.e. the floor
  of a model that makes realistic images but ignores its input;
- ``model``: ``generate(conditions)``, a list of ``H x W x 3`` uint8 images.

Example::

    from ldmkit.evaluate import run_suite
    run_suite("shapes-layout", n=200, mode="reference")   # {"miou": 0.99, "count_acc": 1.0, ...}
    run_suite("shapes-class", mode="model", generate=lambda conds: my_sampler([c.label for c in conds]))

Command line: ``ldmkit eval --suite shapes-layout --n 200 --shuffled --json`` (or
``python -m ldmkit.evaluate shapes-layout --n 200 --shuffled``) prints
``{"suite": ..., "model": null, "n": ..., "metrics": {...}}``, ``n`` being :func:`suite_size`.
Metric definitions and measured ceilings and floors: ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Literal

import numpy as np

from ldmkit.data.base import Sample
from ldmkit.data.shapes import ShapesWorld, area_downsample
from ldmkit.metrics import image as im
from ldmkit.metrics import shapes as sh

__all__ = ["SUITES", "SUITE_KEYS", "suite_keys", "MODES", "run_suite", "suite_conditions", "suite_size", "derangement", "fd_reference_features",
           "main"]

SUITES = ("shapes-class", "shapes-caption", "shapes-layout", "shapes-semantic", "shapes-sr", "shapes-inpaint",
          "shapes-uncond", "recon-shapes", "recon-photos", "emoji-text")
MODES = ("reference", "shuffled", "model")
#: The condition each suite is about. A model that reads several keys (a composed model) is given only
#: these when evaluated on the suite, the others left to their nulls; ``ldmkit eval --keys`` overrides.
#: None: every key the model reads (inpainting's ``inpaint`` field is a plugin's, derived from image + mask).
SUITE_KEYS: dict[str, tuple[str, ...] | None] = {
    "shapes-class": ("label",), "shapes-caption": ("caption",), "shapes-layout": ("boxes",),
    "shapes-semantic": ("segmentation",), "shapes-sr": ("lowres",), "shapes-inpaint": None, "shapes-uncond": (),
    "emoji-text": ("caption",),
}


def suite_keys(suite: str, accepted: Iterable[str]) -> list[str] | None:
    """The condition keys a model reading ``accepted`` is given on ``suite`` (None: every key it reads)."""
    wanted, reads = SUITE_KEYS.get(suite), set(accepted)
    return None if wanted is None else [k for k in wanted if k in reads]


Mode = Literal["reference", "shuffled", "model"]
Generate = Callable[[list[Sample]], list[np.ndarray]]
#: The fd reference set: eval-split scenes [FD_REFERENCE_START, FD_REFERENCE_START + FD_REFERENCE_N),
#: disjoint from the conditions (scenes [0, n), hence n <= FD_REFERENCE_START).
FD_REFERENCE_START = 50_000
FD_REFERENCE_N = 2_000


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded random permutation of ``range(n)`` with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    rng = np.random.default_rng([seed, 0xD1CE])
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def suite_conditions(suite: str, n: int, seed: int = 0, size: int = 32) -> list[Sample]:
    """The held-out conditions a suite scores: eval scenes ``0..n-1`` (``shapes-caption`` adds n
    ``eval-heldout`` scenes; ``recon-photos`` draws n photos)."""
    if suite == "recon-photos":
        return _photo_conditions(n, seed, size)
    if suite == "emoji-text":
        emoji = _eval_emoji(size)
        return [emoji[i] for i in range(min(n, len(emoji)))]
    conditions = [ShapesWorld("eval", size=size, seed=seed)[i] for i in range(n)]
    if suite == "shapes-caption":
        heldout = ShapesWorld("eval-heldout", size=size, seed=seed)
        conditions += [heldout[i] for i in range(n)]
    return conditions


def suite_size(suite: str, n: int, seed: int = 0, size: int = 32) -> int:
    """How many images each of the suite's metrics is computed on when ``n`` is asked for: ``n``, except
    ``recon-photos``, which is capped at the number of held-out photo tiles (30). Cheap: draws nothing.
    (``shapes-caption`` scores n eval and n eval-heldout captions, each metric on n.)"""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; allowed suites: {', '.join(SUITES)}")
    if suite == "recon-photos":
        return min(n, len(_eval_photos(size)))
    if suite == "emoji-text":
        return min(n, len(_eval_emoji(size)))
    return n


@lru_cache(maxsize=4)
def _eval_emoji(size: int):
    from ldmkit.data.emoji import EmojiDataset

    return EmojiDataset(split="eval", size=size)  # the held-out emoji (code points multiple of 10)


def _eval_photos(size: int):
    try:
        from ldmkit.data.photos import PhotosDataset  # written alongside; optional here
    except ImportError as err:
        raise NotImplementedError("recon-photos needs ldmkit.data.photos") from err
    photos = PhotosDataset(split="eval", size=size)
    if len(photos) < 2:
        raise ValueError(f"recon-photos needs >= 2 eval photos, the data set has {len(photos)}")
    return photos


def _photo_conditions(n: int, seed: int, size: int) -> list[Sample]:
    photos = _eval_photos(size)
    order = np.random.default_rng(seed).permutation(len(photos))[: min(n, len(photos))]
    return [photos[int(i)] for i in sorted(order)]


@lru_cache(maxsize=8)
def fd_reference_features(size: int = 32, seed: int = 0) -> np.ndarray:
    """Features of the fd reference set (:data:`FD_REFERENCE_N` eval scenes disjoint from the conditions)."""
    from ldmkit.metrics.features import extract_features

    world = ShapesWorld("eval", size=size, seed=seed)
    images = np.stack([world[FD_REFERENCE_START + i].image for i in range(FD_REFERENCE_N)])
    return extract_features(images)


# ----------------------------------------------------------------------------- one scorer per suite


def _class(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    return {"class_acc": sh.class_acc(conds, imgs)}


def _caption(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    n = len(conds) // 2
    return {"caption_acc": sh.caption_acc(conds[:n], imgs[:n]),
            "caption_acc_heldout": sh.caption_acc(conds[n:], imgs[n:])}


def _layout(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    return sh.layout_scores(conds, imgs)


def _semantic(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    # object_f1 beside the pixel scores: a small square drawn as a circle differs from the map in a few
    # corner pixels only (pixel_acc barely moves), but the parser sees the wrong shape.
    return {**sh.semantic_scores(conds, imgs), "object_f1": sh.object_f1(conds, imgs)}


def _sr(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    truth = [c.image for c in conds]
    bicubic = [im.bicubic_upsample(c.lowres, c.image.shape[:2]) for c in conds]
    factor = conds[0].image.shape[0] // conds[0].lowres.shape[0]
    return {"psnr": im.psnr(imgs, truth), "ssim": im.ssim(imgs, truth),
            "psnr_bicubic": im.psnr(bicubic, truth),
            "lr_psnr": im.psnr([area_downsample(x, factor) for x in imgs], [c.lowres for c in conds])}


def _inpaint(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    truth = [c.image for c in conds]
    # object_f1 counts only objects the visible part determines (>= half outside the hole): 15 % of the
    # suite's objects are wholly hidden, so scoring every object capped any inpainter near 0.92 and gave a
    # grey fill 0.44; object_f1_all is that all-objects score, for comparison (docs/evaluation.md).
    return {"psnr_outside": im.psnr(imgs, truth, [~c.mask for c in conds]),
            "psnr_inside": im.psnr(imgs, truth, [c.mask for c in conds]),
            "object_f1": sh.inpaint_object_f1(conds, imgs),
            "object_f1_all": sh.object_f1(conds, imgs)}


def _fd(imgs: list[np.ndarray], ctx: dict) -> float:
    return im.fd(imgs, fd_reference_features(ctx["size"], ctx["seed"]))


def _uncond(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    return {"valid_scene_rate": sh.valid_scene_rate(imgs), "fd": _fd(imgs, ctx)}


def _recon_shapes(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    truth = [c.image for c in conds]
    # object_f1: PSNR is dominated by the flat background; a reconstruction that turns a small square
    # into a circle barely moves it, but the parser sees the wrong shape.
    return {"psnr": im.psnr(imgs, truth), "ssim": im.ssim(imgs, truth), "object_f1": sh.object_f1(conds, imgs),
            "fd": _fd(imgs, ctx)}


def _recon_photos(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    truth = [c.image for c in conds]
    # fd against the originals of the same photos (there are only 30 held-out tiles, no disjoint set to
    # spare), in the shapes-trained feature space: comparable between photo autoencoders only.
    return {"psnr": im.psnr(imgs, truth), "ssim": im.ssim(imgs, truth), "fd": im.fd(imgs, truth)}


def _emoji_text(conds: list[Sample], imgs: list[np.ndarray], ctx: dict) -> dict[str, float]:
    from ldmkit.metrics.emoji import retrieval_scores

    return retrieval_scores(imgs, [c.image for c in conds])


_SCORERS: dict[str, Callable[[list[Sample], list[np.ndarray], dict], dict[str, float]]] = {
    "shapes-class": _class, "shapes-caption": _caption, "shapes-layout": _layout, "shapes-semantic": _semantic,
    "shapes-sr": _sr, "shapes-inpaint": _inpaint, "shapes-uncond": _uncond, "recon-shapes": _recon_shapes,
    "recon-photos": _recon_photos, "emoji-text": _emoji_text,
}


def _check_generated(images: Sequence[np.ndarray], conditions: list[Sample]) -> list[np.ndarray]:
    if len(images) != len(conditions):
        raise ValueError(f"generate returned {len(images)} images for {len(conditions)} conditions")
    out = []
    for i, (x, c) in enumerate(zip(images, conditions)):
        x = np.asarray(x)
        want = c.image.shape
        if x.dtype != np.uint8 or x.shape != want:
            raise ValueError(f"generated image {i} must be {want} uint8, got {x.shape} {x.dtype}")
        out.append(x)
    return out


def run_suite(suite: str, *, n: int = 200, seed: int = 0, mode: Mode = "reference",
              generate: Generate | None = None, size: int = 32, progress: bool = False) -> dict[str, float]:
    """Score one suite on ``n`` held-out conditions (eval scenes, deterministic by ``seed``).

    Args:
        suite: one of :data:`SUITES`.
        n: number of conditions, 2..50,000 (``shapes-caption`` scores n eval and n eval-heldout captions;
            ``recon-photos`` caps it at the number of held-out photo tiles, see :func:`suite_size`).
        seed: selects the conditions (and the shuffled mode's derangement).
        mode: ``reference`` (ground truth, the ceiling), ``shuffled`` (another scene's ground truth, the
            floor) or ``model`` (``generate(conditions)``).
        generate: required for ``mode="model"``; maps the condition Samples to ``H x W x 3`` uint8 images.
        size: image side of the shapes world (a multiple of 4, >= 16).
        progress: print stage timings to stderr.

    Returns:
        The suite's metrics as ``{name: float}`` (see ``docs/evaluation.md``).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; allowed suites: {', '.join(SUITES)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(n, int) or not 2 <= n <= FD_REFERENCE_START:
        raise ValueError(f"n must be an int in 2..{FD_REFERENCE_START}, got {n!r}")
    if mode == "model" and generate is None:
        raise ValueError("mode='model' needs generate=callable(conditions) -> images")
    if mode != "model" and generate is not None:
        raise ValueError(f"generate is only used with mode='model', not mode={mode!r}")
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[{suite} {mode}] {msg} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    conditions = suite_conditions(suite, n, seed, size)
    say(f"{len(conditions)} conditions")
    if mode == "reference":
        images = [c.image for c in conditions]
    elif mode == "shuffled":
        perm = derangement(len(conditions), seed)
        images = [conditions[j].image for j in perm]
    else:
        images = _check_generated(generate(conditions), conditions)
        say("generated")
    metrics = _SCORERS[suite](conditions, images, {"size": size, "seed": seed})
    say("scored")
    return {k: float(v) for k, v in metrics.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ldmkit.evaluate SUITE [--n N] [--seed S] [--size PX] (--reference | --shuffled)``."""
    parser = argparse.ArgumentParser(prog="python -m ldmkit.evaluate", description="Run an evaluation suite.")
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--reference", action="store_const", const="reference", dest="mode",
                       help="score the ground-truth images (the ceiling; default)")
    group.add_argument("--shuffled", action="store_const", const="shuffled", dest="mode",
                       help="score other scenes' ground-truth images (the floor)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    metrics = run_suite(args.suite, n=args.n, seed=args.seed, mode=args.mode or "reference", size=args.size,
                        progress=args.progress)
    n = suite_size(args.suite, args.n, args.seed, args.size)
    print(json.dumps({"suite": args.suite, "model": None, "n": n, "metrics": metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
