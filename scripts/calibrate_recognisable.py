"""Measure the recognisability bound of the shapes metrics (``MAX_RECOGNISABLE_MISFIT``).

Usage: python scripts/calibrate_recognisable.py [--n 1500] [--probes 300] [--json]

An object counts as its (colour, shape) in class_acc, caption_acc, layout labels, semantic maps and
object F1 only when its misfit to that shape is within the bound. The bound must pass what any latent
model at best produces, the shipped autoencoder's reconstructions of world scenes, and fail shapes the
world never draws. This prints, per (shape, size), the misfit percentiles of the objects parsed from
zoo:shapes-kl-f4 reconstructions of ``n`` eval scenes (indices 10,000 on, disjoint from the suites'
conditions), the percentiles of the probe shapes (ldmkit/metrics/probes.py: domes, ellipses,
diamonds, teardrops, rounded squares, merged blobs; each probe's worst-fitting object), and the fraction
of each that the current bound accepts.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from ldmkit.data import load_dataset
from ldmkit.metrics import shapes as sh
from ldmkit.metrics.probes import WRONG_SHAPES, probe_scene
from ldmkit.models.autoencoder import load_autoencoder
from ldmkit.models.ldm import images_to_tensor, tensor_to_images  # noqa: E402
from ldmkit.zoo import resolve  # noqa: E402


def _summary(misfits: list[float], accepted: list[bool]) -> dict[str, float]:
    v = np.asarray(misfits)
    p = np.percentile(v, [0.1, 50, 99, 99.9])
    return {"n": len(v), "p0.1": round(float(p[0]), 3), "p50": round(float(p[1]), 3), "p99": round(float(p[2]), 3),
            "p99.9": round(float(p[3]), 3), "max": round(float(v.max()), 3), "accepted": round(float(np.mean(accepted)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500, help="eval scenes reconstructed (default 1500)")
    ap.add_argument("--probes", type=int, default=300, help="probe scenes per family (default 300)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("shapes", split="eval")
    images = [data[i].image for i in range(10_000, 10_000 + args.n)]
    ae = load_autoencoder(resolve("zoo:shapes-kl-f4")).eval()
    with torch.no_grad():
        recon = np.concatenate([tensor_to_images(ae.reconstruct(images_to_tensor(images[i:i + 250])))
                                for i in range(0, len(images), 250)])
    out: dict[str, dict] = {"bound": dict(sh.MAX_RECOGNISABLE_MISFIT), "reconstructions": {}, "probes": {}}
    groups: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for im in recon:
        for o in sh.parse_scene(im):
            groups[f"{o.shape} {o.size}"][0].append(o.misfit)
            groups[f"{o.shape} {o.size}"][1].append(o.recognisable)
    out["reconstructions"] = {k: _summary(*groups[k]) for k in sorted(groups)}
    for family in [*WRONG_SHAPES, "merged"]:
        worst = [max(sh.parse_scene(probe_scene(family, i)), key=lambda o: o.misfit) for i in range(args.probes)]
        out["probes"][family] = _summary([o.misfit for o in worst], [o.recognisable for o in worst])
    if args.json:
        print(json.dumps(out))
        return
    print(f"bound (MAX_RECOGNISABLE_MISFIT): {out['bound']}")
    print(f"{'':24s} {'n':>5s} {'p0.1':>6s} {'p50':>6s} {'p99':>6s} {'p99.9':>6s} {'max':>6s} {'accepted':>8s}")
    for title, rows in (("reconstruction", out["reconstructions"]), ("probe", out["probes"])):
        for k, r in rows.items():
            print(f"{title + ' ' + k:24s} {r['n']:5d} {r['p0.1']:6.3f} {r['p50']:6.3f} {r['p99']:6.3f} "
                  f"{r['p99.9']:6.3f} {r['max']:6.3f} {r['accepted']:8.3f}")


if __name__ == "__main__":
    main()
