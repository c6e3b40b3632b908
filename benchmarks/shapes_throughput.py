"""Shapes-world generation throughput on one core: full Samples (image and all ground truth) per second.

Usage: python benchmarks/shapes_throughput.py [--size 32] [--n 3000] [--repeats 3]
The last line of output is one JSON object; ``scenes_per_s`` is the best repeat (least disturbed by other
processes), ``median_scenes_per_s`` the median. Issue 3's target: >= 2,000 scenes/s at 32x32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from ldmkit.data.shapes import ShapesWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = ShapesWorld("train", size=args.size, seed=0)
    for i in range(200):  # warm-up
        world[i]
    rates = []
    for r in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.n):
            world[r * args.n + i]
        rates.append(args.n / (time.perf_counter() - start))
        print(f"repeat {r}: {rates[-1]:.0f} scenes/s")
    print(json.dumps({
        "benchmark": "shapes_throughput", "size": args.size, "n": args.n, "threads": 1,
        "scenes_per_s": round(max(rates), 1), "median_scenes_per_s": round(statistics.median(rates), 1),
        "target_scenes_per_s": 2000, "python": platform.python_version(), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
