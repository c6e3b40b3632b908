"""Fidelity against the number of UNet evaluations (NFE), for every sampler.

Usage: python benchmarks/sampler_nfe.py [--model zoo:shapes-class] [--suite shapes-class] [--n 128]
       [--steps 5 10 20 50] [--samplers ddpm ddim plms dpmpp_2m] [--guidance S]

For each sampler and step count it generates one image per held-out condition of the suite (the same
conditions and seeds for every sampler) and scores them with the suite's metrics; NFE is counted by
wrapping the UNet, so PLMS's extra first evaluation and guidance branches (one batched call each step)
are counted as what they are. Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:shapes-class")
    p.add_argument("--suite", default="shapes-class")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim", "plms", "dpmpp_2m"])
    p.add_argument("--guidance", type=float, default=None, help="default: the model's own (config.guidance)")
    args = p.parse_args()
    import ldmkit
    from ldmkit.api import DiffusionGenerator
    from ldmkit.evaluate import run_suite

    model = ldmkit.load(args.model)
    if args.guidance is None:
        args.guidance = model.config.guidance
    calls = {"n": 0}
    forward = model.unet.forward

    def counting(*a, **kw):
        calls["n"] += 1
        return forward(*a, **kw)

    model.unet.forward = counting
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            gen = DiffusionGenerator(model, sampler=sampler, steps=steps, guidance=args.guidance, seed=0,
                                     batch_size=args.n, unconditional=args.suite == "shapes-uncond")
            calls["n"] = 0
            t0 = time.perf_counter()
            metrics = run_suite(args.suite, n=args.n, seed=0, mode="model", generate=gen)
            row = {"sampler": sampler, "steps": steps, "nfe": calls["n"], "seconds": round(time.perf_counter() - t0, 1), **metrics}
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if k not in ("sampler", "steps", "nfe", "seconds")]
    print("\n| sampler | steps | NFE | " + " | ".join(keys) + " | seconds |")
    print("|---|---|---|" + "---|" * len(keys) + "---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {r['seconds']} |")
    print(json.dumps({"benchmark": "sampler_nfe", "model": args.model, "suite": args.suite, "n": args.n,
                      "guidance": args.guidance, "torch_threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
