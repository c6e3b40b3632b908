"""How the OpenMP wait policy moves a UNet's step time, alone and beside a busy process.

Each policy runs in a fresh process (OpenMP reads it when torch loads): ``passive`` (OMP_WAIT_POLICY=PASSIVE,
ldmkit's choice on a busy machine), ``short-spin`` (GOMP_SPINCOUNT=ldmkit._threads.SPIN_COUNT, its choice on
free cores) and ``spin`` (OMP_WAIT_POLICY=ACTIVE: unbounded spinning, close to GNU OpenMP's default long spin
that a plain ``import torch`` gets). Each measures the median
train step (forward, backward, fused AdamW; batch 16) and sample step (a guided forward, batch 32) of the
benchmark UNet of ``unet_vs_diffusers.py``, first with the machine to itself, then beside a neighbour: a
one-thread process multiplying matrices without pause (a training run on one core, say). The last line of
output is one JSON object.

Usage: python benchmarks/wait_policy.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "short-spin": {"GOMP_SPINCOUNT": None}, "spin": {}}
NEIGHBOUR = ("import torch, time\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
             "while True:\n    a = (a @ a).tanh()\n")


def child(repeats: int) -> None:
    """In a fresh process whose environment already holds the policy: time the two steps."""
    import statistics

    sys.path.insert(0, str(HERE))
    import torch
    from unet_vs_diffusers import build, inputs

    model, call = build("ldmkit", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, t, ctx = inputs(16, 8, "cpu")
    x2, t2, ctx2 = (torch.cat([a, a]) for a in (x, t, ctx))

    def train() -> float:
        t0 = time.perf_counter()
        loss = call(x, t, ctx).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    def sample() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            call(x2, t2, ctx2)
        return time.perf_counter() - t0

    out = {}
    for name, fn in (("train_step_ms", train), ("sample_step_ms", sample)):
        fn(), fn()
        out[name] = round(statistics.median(fn() for _ in range(repeats)) * 1000, 1)
    print(json.dumps(out))


def run(policy: str, repeats: int) -> dict:
    from ldmkit._threads import SPIN_COUNT

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({k: v or str(SPIN_COUNT) for k, v in POLICIES[policy].items()})
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if policy == "spin":
        env["OMP_WAIT_POLICY"] = "ACTIVE"  # GNU OpenMP's unbounded spin, stated so ldmkit keeps it
    res = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats)], env=env,
                         capture_output=True, text=True, check=True, timeout=900)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.repeats)
        return
    results: dict[str, dict] = {"alone": {}, "busy_neighbour": {}}
    for policy in POLICIES:
        results["alone"][policy] = run(policy, args.repeats)
        print("alone         ", policy, results["alone"][policy], flush=True)
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        time.sleep(1.0)
        for policy in POLICIES:
            results["busy_neighbour"][policy] = run(policy, args.repeats)
            print("busy neighbour", policy, results["busy_neighbour"][policy], flush=True)
    finally:
        neighbour.kill()
        neighbour.wait()
    import ldmkit

    print(json.dumps({"benchmark": "wait_policy", "cores": os.cpu_count(), "ldmkit_choice_here": ldmkit.WAIT_POLICY,
                      **results}))


if __name__ == "__main__":
    main()
