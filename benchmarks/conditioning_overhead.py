"""What composing conditioners costs at sampling, and how sampling memory grows with the image size.

Usage: python benchmarks/conditioning_overhead.py [--batch 64] [--steps 50] [--repeats 3] [--guidance 3]
       [--sizes 32 64 128] [--memory-batch 8] [--memory-steps 2] [--memory-repeats 3] [--device cpu|cuda]
       [--skip-memory]

(a) Stack overhead. Two LatentDiffusion models with the same UNet configuration (that of
``configs/ldm/shapes-multi.yaml``), random weights, on the 8x8x3 latents of ``zoo:shapes-kl-f4``:

- ``multi`` (5 conditioner kinds, 6 conditioners): class (1 token), text (16 tokens), layout (4 tokens),
  semantic (8 channels), lowres (8 channels) + noise_level (a vector), with the settings of
  ``configs/ldm/shapes-multi.yaml`` and ``configs/ldm/shapes-sr.yaml``;
- ``class`` (1 conditioner): the class label as one token (``configs/ldm/shapes-class.yaml``).

Each samples ``--batch`` images (DDIM, ``--steps``, joint classifier-free guidance ``--guidance``, so
the UNet sees a doubled batch) given every condition it takes, read from held-out shapes scenes
(``ShapesWorld("eval")``). During one ``model.sample`` call the UNet's forward (hooks) and the decoder
(``decode_latents``) are timed, so the wall time splits into

    unet + decode + outside,   overhead = outside / wall

where ``outside`` is everything else, itemized: the conditioners (``stack.encode``, once per call, and
each conditioner's ``encode``), the guided denoiser's setup (its ``__init__``: the nulls of the
unconditional branch and ``stack.compose`` per branch, once per call), the guidance combination (the
guided denoiser's calls less the UNet's) and the rest (the sampler's arithmetic, argument checks).
The issue's target: the multi-conditioner stack's overhead <= 5 % of sampling. As a cross-check that
does not rely on hooks, the UNet alone is then called as many times on the very inputs it got
(captured) and the decoder once, and ``overhead_subtractive = (wall - unet_alone - decode_alone) /
wall`` — a difference of separately timed runs, so far noisier than ``overhead`` on a loaded machine
(it can come out negative).
Most of ``outside`` is paid once per call (``outside_fixed_s``: conditioners and guidance setup), the
rest per step (``outside_per_step_s``), so the overhead fraction falls with ``--steps`` and ``--batch``:
judge the target at the defaults (64 images, 50 steps), not at small test settings.

Note: the multi model's UNet is dearer per call than the class model's — a 21-token context instead
of 1, and 3 + 16 input channels instead of 3, plus a vector embedding. That is UNet cost, which the
conditioning routes ask for, not stack overhead: it is reported as ``unet_s`` (and ``unet_ratio``),
apart from ``overhead``. Timings are medians of paired, interleaved runs (multi, class, class,
multi, ...) after a short warm-up; fractions are medians of the per-run fractions.

(b) Memory at larger sizes. The class model samples ``--memory-batch`` images (guidance ``--guidance``)
at each of ``--sizes`` (default 1x, 2x and 4x the 32 px training size: convolutional sampling), each
in a fresh process (``--memory-repeats`` of them per size, median). On the CPU the figure is the
growth of the peak resident set during sampling (the peak mark is reset through
``/proc/self/clear_refs`` after the model is built and warmed up at the training size); on CUDA it is
``torch.cuda.max_memory_allocated`` growth. Beside each measurement is
``model.estimate_sampling_bytes`` (the coarse estimate sampling uses to refuse requests that cannot
fit; its attention term assumes materialized ``N x N`` scores, which fused attention kernels do not
keep, so it is meant to be on the high side). The peak is reached in the first step, so
``--memory-steps`` is small. ``growth_ratio`` is peak growth at the largest size / at the smallest
(``estimate_ratio`` the same for the estimate), to compare with the pixel ratio (16 for 128 vs 32
px): about 16 is linear in pixels, above it super-linear (self-attention over the latent positions),
below it fixed costs still weigh at the smallest size.

The last line of output is one JSON object.
"""

from __future__ import annotations

import os

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AUTOENCODER = "zoo:shapes-kl-f4"
KEYS = {"multi": ("label", "caption", "boxes", "segmentation", "lowres"), "class": ("label",)}


def model_config(kind: str) -> dict:
    """The model section of the benchmark's config: ``multi`` = shapes-multi + shapes-sr's conditioners."""
    from ldmkit.config import load_yaml

    if kind == "class":
        return load_yaml(ROOT / "configs/ldm/shapes-class.yaml")["model"]
    multi = copy.deepcopy(load_yaml(ROOT / "configs/ldm/shapes-multi.yaml")["model"])
    sr = load_yaml(ROOT / "configs/ldm/shapes-sr.yaml")["model"]
    # the UNet is shapes-multi's (shapes-sr's lacks its position code); the latents must agree
    if any(multi[k] != sr[k] for k in ("image_size", "latent_channels", "downsample_factor")):
        raise SystemExit("shapes-multi and shapes-sr no longer share a latent configuration; update this benchmark")
    cond = multi["conditioning"]
    cond["conditioners"] += copy.deepcopy(sr["conditioning"]["conditioners"])
    cond["vector_dim"] = sr["conditioning"]["vector_dim"]
    cond["dropout_groups"] = copy.deepcopy(sr["conditioning"]["dropout_groups"])
    return multi


def build(kind: str, device: str):
    """A LatentDiffusion with random weights (seed 0) and the zoo's KL-f4 autoencoder, in eval mode."""
    import ldmkit
    from ldmkit.config import load_config
    from ldmkit.models.ldm import LatentDiffusion

    cfg = load_config(model_config(kind))
    torch.manual_seed(0)
    ae = ldmkit.load(AUTOENCODER)
    return LatentDiffusion(cfg, ae).to(device).eval()


def conditions(kind: str, n: int) -> dict[str, list]:
    """Every condition the model takes, for ``n`` held-out scenes (``ShapesWorld("eval")``)."""
    from ldmkit.data.shapes import ShapesWorld
    from ldmkit.fields import sample_value

    world = ShapesWorld("eval", size=32)
    scenes = [world[i] for i in range(n)]
    return {key: [sample_value(s, key, index=i) for i, s in enumerate(scenes)] for key in KEYS[kind]}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def instrumented(model, device: str):
    """Time (seconds, accumulated into the yielded dict) the UNet's forward, the decoder, the stack's encode
    and compose, and the guided denoiser's calls, during the block; capture the UNet's and the decoder's
    first inputs (``captured``) for the cross-check."""
    import ldmkit.models.ldm as ldm_module

    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    captured: dict[str, tuple] = {}
    starts: list[float] = []

    def pre(_module, args, kwargs):
        if "unet" not in captured:
            captured["unet"] = (args, kwargs)
        sync(device)
        starts.append(time.perf_counter())

    def post(_module, _args, _kwargs, _out):
        sync(device)
        times["unet"] += time.perf_counter() - starts.pop()
        counts["unet"] += 1

    def timed(name: str, fn, capture: bool = False):
        def wrapper(*args, **kwargs):
            if capture and name not in captured:
                captured[name] = (args, kwargs)
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                times[name] += time.perf_counter() - t0
                counts[name] += 1
        return wrapper

    handles = [model.unet.register_forward_pre_hook(pre, with_kwargs=True),
               model.unet.register_forward_hook(post, with_kwargs=True)]
    denoiser_class = ldm_module.GuidedDenoiser
    original_call = denoiser_class.__call__
    original_init = denoiser_class.__init__
    patched = [(model, "decode_latents", "decode"), (model.stack, "encode", "encode"),
               (model.stack, "nulls", "nulls"), (model.stack, "compose", "compose")]
    patched += [(c, "encode", f"encode:{name}") for name, c in model.stack.conditioners.items()]
    for obj, attr, label in patched:  # instance attributes shadow the methods until deleted
        setattr(obj, attr, timed(label, getattr(obj, attr), capture=label == "decode"))
    denoiser_class.__call__ = timed("denoiser", original_call)
    denoiser_class.__init__ = timed("denoiser_setup", original_init)
    try:
        yield times, counts, captured
    finally:
        denoiser_class.__call__ = original_call
        denoiser_class.__init__ = original_init
        for h in handles:
            h.remove()
        for obj, name, _ in patched:
            if name in obj.__dict__:
                delattr(obj, name)


def run_once(model, conds, args) -> dict[str, float]:
    """One instrumented ``model.sample`` call, then the UNet alone on its captured inputs (as many calls)
    and the decoder alone: seconds per part, and the overhead fractions."""
    with instrumented(model, args.device) as (times, counts, captured):
        sync(args.device)
        t0 = time.perf_counter()
        model.sample(conds, guidance=args.guidance, sampler="ddim", steps=args.steps, seed=0)
        sync(args.device)
        wall = time.perf_counter() - t0
    if counts["unet"] != args.steps:
        raise RuntimeError(f"expected {args.steps} UNet calls (DDIM, batched guidance), got {counts['unet']}")
    u_args, u_kwargs = captured["unet"]
    (z,), _ = captured["decode"]
    with torch.inference_mode():
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(counts["unet"]):
            model.unet(*u_args, **u_kwargs)
        sync(args.device)
        unet_alone = time.perf_counter() - t0
        model.decode_latents(z)
        sync(args.device)
        decode_alone = time.perf_counter() - t0 - unet_alone
    outside = wall - times["unet"] - times["decode"]
    combine = times["denoiser"] - times["unet"]
    rest = outside - times["encode"] - times["denoiser_setup"] - combine
    per_conditioner = {f"{k}_s": v for k, v in times.items() if k.startswith("encode:")}
    return {
        "wall_s": wall, "unet_s": times["unet"], "decode_s": times["decode"], "outside_s": outside,
        "encode_s": times["encode"], **per_conditioner, "guidance_setup_s": times["denoiser_setup"],
        "nulls_s": times["nulls"], "compose_s": times["compose"], "guidance_combine_s": combine, "sampler_and_rest_s": rest,
        "unet_alone_s": unet_alone, "decode_alone_s": decode_alone,
        "overhead": outside / wall, "overhead_subtractive": (wall - unet_alone - decode_alone) / wall,
        "unet_batch": int(u_args[0].shape[0]),
    }


# -- (b) memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(size: int, args) -> None:
    """In a fresh process: the peak memory growth (bytes) of sampling the class model at ``size`` px, and the
    model's estimate; one JSON line."""
    model = build("class", args.device)
    conds = conditions("class", args.memory_batch)
    estimate = model.estimate_sampling_bytes(args.memory_batch, size, size, guided=True)
    model.sample(conditions("class", 1), guidance=args.guidance, steps=1, seed=0)  # warm-up: one-time allocations
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        base = _status_kib("VmRSS") * 1024
    model.sample(conds, guidance=args.guidance, steps=args.memory_steps, seed=0, height=size, width=size)
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"size": size, "peak_growth_bytes": peak - base, "estimate_bytes": estimate}))


def memory(args) -> dict[int, dict]:
    """Per size, the median over ``--memory-repeats`` fresh processes (the allocator's behaviour varies a little
    from run to run), run in interleaved order."""
    found: dict[int, list[dict]] = {size: [] for size in args.sizes}
    for r in range(args.memory_repeats):
        for size in (args.sizes if r % 2 == 0 else args.sizes[::-1]):
            cmd = [sys.executable, __file__, "--memory-child", str(size), "--memory-batch", str(args.memory_batch),
                   "--memory-steps", str(args.memory_steps), "--guidance", str(args.guidance), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"memory run at {size} px failed:\n{out.stderr.strip()[-3000:]}")
            found[size].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {}
    for size, runs in found.items():
        growth = [run["peak_growth_bytes"] for run in runs]
        results[size] = {"peak_growth_bytes": statistics.median(growth), "runs_bytes": growth,
                         "estimate_bytes": runs[0]["estimate_bytes"]}
        print(f"memory, {args.memory_batch} images at {size}x{size}: peak growth {results[size]['peak_growth_bytes'] / 2**20:,.1f} MiB "
              f"(runs {', '.join(f'{g / 2**20:.1f}' for g in growth)})  estimate {results[size]['estimate_bytes'] / 2**20:,.1f} MiB")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="images per sample call in the overhead timing")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the overhead timing")
    p.add_argument("--repeats", type=int, default=3, help="paired runs per model (medians reported)")
    p.add_argument("--guidance", type=float, default=3.0, help="joint classifier-free guidance scale (not 0 or 1: two branches)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="image sizes (px) of the memory runs")
    p.add_argument("--memory-batch", type=int, default=8, help="images per sample call in the memory runs")
    p.add_argument("--memory-steps", type=int, default=2, help="DDIM steps of the memory runs (the peak is in the first)")
    p.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per size in the memory runs (median)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip-memory", action="store_true", help="only the overhead timing")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("batch", "steps", "repeats", "memory_batch", "memory_steps", "memory_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.guidance in (0.0, 1.0):
        p.error("--guidance 0 or 1 evaluates one branch only; use a guided scale such as 3")
    if any(s < 16 or s % 8 for s in args.sizes):
        p.error("--sizes must be multiples of 8 px, at least 16 (f=4 latents, one UNet halving)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.device == "cpu" and not args.skip_memory and not os.path.exists("/proc/self/clear_refs"):
        p.error("CPU memory runs need Linux /proc/self/clear_refs; use --skip-memory")
    if args.memory_child:
        memory_child(args.memory_child, args)
        return

    models = {k: build(k, args.device) for k in ("multi", "class")}
    conds = {k: conditions(k, args.batch) for k in models}
    params = {k: {"unet": sum(q.numel() for q in m.unet.parameters()), "stack": sum(q.numel() for q in m.stack.parameters())}
              for k, m in models.items()}
    wiring = {k: m.unet.wiring.as_dict() | {"in_channels": m.unet.in_channels} for k, m in models.items()}
    for k, m in models.items():
        print(f"{k}: conditioners {', '.join(m.stack.names)}; UNet {params[k]['unet']:,} params, wiring {wiring[k]}")
        m.sample({key: v[:2] for key, v in conds[k].items()}, guidance=args.guidance, steps=2, seed=0)  # warm-up

    runs: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for r in range(args.repeats):
        for k in (("multi", "class") if r % 2 == 0 else ("class", "multi")):
            runs[k].append(run_once(models[k], conds[k], args))
    med = {k: {f: statistics.median(run[f] for run in v) for f in v[0]} for k, v in runs.items()}
    for k, m in med.items():
        print(f"{k:<5} sample {args.batch} (DDIM-{args.steps}, guidance {args.guidance:g}, UNet batch {int(m['unet_batch'])}): "
              f"{m['wall_s']:.3f}s = UNet {m['unet_s']:.3f}s + decode {m['decode_s']:.3f}s + outside {m['outside_s']:.4f}s "
              f"(encode {m['encode_s'] * 1000:.1f} ms, guidance setup {m['guidance_setup_s'] * 1000:.1f} ms, guidance "
              f"combine {m['guidance_combine_s'] * 1000:.1f} ms, sampler+rest {m['sampler_and_rest_s'] * 1000:.1f} ms)  "
              f"overhead {m['overhead']:.2%} (subtractive {m['overhead_subtractive']:.2%})")
        per = {f[len('encode:'):-2]: v for f, v in m.items() if f.startswith("encode:")}
        print(f"      encode by conditioner (ms): {', '.join(f'{n} {v * 1000:.1f}' for n, v in per.items())}; "
              f"of the guidance setup: nulls {m['nulls_s'] * 1000:.1f}, compose {m['compose_s'] * 1000:.1f}")
    for m in med.values():  # per call (conditioners, guidance setup) versus per step (combination, sampler)
        m["outside_fixed_s"] = m["encode_s"] + m["guidance_setup_s"]
        m["outside_per_step_s"] = (m["guidance_combine_s"] + m["sampler_and_rest_s"]) / args.steps
    f = med["multi"]
    print(f"multi: outside = {f['outside_fixed_s'] * 1000:.1f} ms once per call + {f['outside_per_step_s'] * 1000:.2f} ms per "
          f"step, against UNet {f['unet_s'] / args.steps * 1000:.1f} ms per step (batch {int(f['unet_batch'])})")
    diff = {
        "overhead": med["multi"]["overhead"] - med["class"]["overhead"],
        "outside_s": med["multi"]["outside_s"] - med["class"]["outside_s"],
        "wall_s": med["multi"]["wall_s"] - med["class"]["wall_s"],
        "unet_s": med["multi"]["unet_s"] - med["class"]["unet_s"],
    }
    meets = med["multi"]["overhead"] <= 0.05
    print(f"multi - class: overhead {diff['overhead']:+.2%}, outside {diff['outside_s'] * 1000:+.1f} ms, "
          f"UNet {diff['unet_s']:+.3f}s (x{med['multi']['unet_s'] / med['class']['unet_s']:.2f}: longer context, more "
          f"input channels; UNet cost, not stack overhead)")
    print(f"target: multi-conditioner overhead <= 5%: {'met' if meets else 'NOT met'} ({med['multi']['overhead']:.2%})")

    mem = {}
    if not args.skip_memory:
        mem = memory(args)
        lo, hi = min(mem), max(mem)
        growth_ratio = mem[hi]["peak_growth_bytes"] / max(mem[lo]["peak_growth_bytes"], 1)
        estimate_ratio = mem[hi]["estimate_bytes"] / mem[lo]["estimate_bytes"]
        pixel_ratio = (hi / lo) ** 2
        print(f"peak growth {hi} px / {lo} px: x{growth_ratio:.1f} measured, x{estimate_ratio:.1f} estimated, "
              f"x{pixel_ratio:.0f} pixels")

    print(json.dumps({
        "benchmark": "conditioning_overhead", "device": args.device, "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "autoencoder": AUTOENCODER, "batch": args.batch, "steps": args.steps, "sampler": "ddim",
        "guidance": args.guidance, "repeats": args.repeats,
        "conditioners": {k: m.stack.names for k, m in models.items()}, "wiring": wiring, "parameters": params,
        "sampling": {k: {f: (round(v, 5) if f != "unet_batch" else int(v)) for f, v in m.items()} for k, m in med.items()},
        "multi_minus_class": {f: round(v, 5) for f, v in diff.items()},
        "unet_ratio": round(med["multi"]["unet_s"] / med["class"]["unet_s"], 3),
        "target_overhead": 0.05, "target_met": meets,
        "memory": None if not mem else {
            "model": "class", "batch": args.memory_batch, "steps": args.memory_steps,
            "measure": "cuda max_memory_allocated growth" if args.device == "cuda" else "peak RSS growth (VmHWM)",
            "repeats": args.memory_repeats,
            "by_size": {str(s): {"peak_growth_mib": round(r["peak_growth_bytes"] / 2**20, 1),
                                 "runs_mib": [round(g / 2**20, 1) for g in r["runs_bytes"]],
                                 "estimate_mib": round(r["estimate_bytes"] / 2**20, 1)} for s, r in mem.items()},
            "growth_ratio": round(growth_ratio, 2), "estimate_ratio": round(estimate_ratio, 2),
            "pixel_ratio": pixel_ratio, "sizes": [lo, hi],
        },
    }))


if __name__ == "__main__":
    main()
