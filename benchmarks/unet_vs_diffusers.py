"""ldmkit's UNet against diffusers' UNet2DConditionModel at the same configuration.

Both models get the same block structure (channel widths, res blocks per level, cross-attention levels,
heads, GEGLU transformer blocks with linear projections); their parameter counts are printed and must
agree within 2 %. Timings are medians of paired, interleaved runs (ldmkit, diffusers, ldmkit, ...):

- train step: forward + backward + AdamW step on a batch, each library with the AdamW its own trainer
  builds: ldmkit's ``fused_optimizer`` default (fused), diffusers' example trainers' plain
  ``torch.optim.AdamW`` (examples/text_to_image/train_text_to_image.py); also reported with the same
  per-parameter AdamW on both sides (``train_step_ratio_same_optimizer``: the UNets alone);
- sample step: one forward under ``torch.inference_mode`` on a doubled batch (classifier-free
  guidance evaluated as one batched call). On the CPU also ``ldmkit_prepack``: the same
  weights inside ``UNet.prepacked()``, entered once, as ``sample(..., prepack=True)`` runs a sampling loop
  (weights packed at the first step and kept; the context's keys and values kept across steps), and
  ``ldmkit_compiled``: inside ``UNet.compiled()``, as ``sample(..., compile=True)`` runs it (torch.compile,
  inductor, weights frozen; compiled at the first warm-up call, whose time is reported as ``compile_s``;
  ``--no-compile`` leaves it out).

Ratios are diffusers time / ldmkit time, so above 1 means ldmkit is faster. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA, and on the CPU the growth of the peak resident set of a
fresh process running a few train steps of one model. The last line of output is one JSON object.

Usage: python benchmarks/unet_vs_diffusers.py [--device cpu|cuda] [--batch 16] [--latent 8] [--repeats 7]
"""

from __future__ import annotations

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sample_vs_diffusers, beside this file

import torch

CONFIG = {"model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [1, 2], "num_heads": 4}
CONTEXT_DIM, CONTEXT_TOKENS, LATENT_CHANNELS = 128, 8, 4


def build(which: str, device: str):
    """ldmkit's UNet at CONFIG, or diffusers' UNet2DConditionModel of the same configuration (built from it by
    ``sample_vs_diffusers.build_diffusers_unet``, which checks heads, group norms and the time embedding;
    with ``copy`` the diffusers model also gets ldmkit's weights — not needed for timing)."""
    from ldmkit.conditioning import UNetWiring
    from ldmkit.config import UNetConfig
    from ldmkit.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(UNetConfig(**CONFIG), LATENT_CHANNELS, UNetWiring(CONTEXT_DIM, CONTEXT_TOKENS, 0, None))
    if which == "ldmkit":
        model = unet

        def call(x, t, ctx):
            return model(x, t, ctx, None)
    else:
        from sample_vs_diffusers import build_diffusers_unet

        model = build_diffusers_unet(unet).train()

        def call(x, t, ctx):
            return model(x, t, encoder_hidden_states=ctx).sample
    return model.to(device), call


def inputs(batch: int, latent: int, device: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, CONTEXT_TOKENS, CONTEXT_DIM, generator=g).to(device)
    return x, t, ctx


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(which: str, batch: int, latent: int) -> None:
    """Run in a fresh process: peak resident-set growth (KiB) over train steps of one model on the CPU.

    The model and inputs are built first; then the kernel's peak-RSS mark is reset (``5`` into
    ``/proc/self/clear_refs``) so the peak measured is that of training alone (activations, gradients,
    AdamW state)."""
    model, call = build(which, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, ctx = inputs(batch, latent, "cpu")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS")
    for _ in range(3):
        loss = call(x, t, ctx).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(_status_kib("VmHWM") - base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="CPU: leave out the compiled sample step (its compile takes tens of seconds)")
    p.add_argument("--memory-child", choices=["ldmkit", "diffusers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.latent)
        return

    models = {w: build(w, args.device) for w in ("ldmkit", "diffusers")}
    stack = contextlib.ExitStack()
    params = {w: sum(q.numel() for q in m.parameters()) for w, (m, _) in models.items()}
    print(f"parameters: ldmkit {params['ldmkit']:,}  diffusers {params['diffusers']:,}")
    if abs(params["ldmkit"] / params["diffusers"] - 1) > 0.02:
        raise SystemExit("parameter counts differ by more than 2%: the configurations do not match")
    x, t, ctx = inputs(args.batch, args.latent, args.device)
    x2, t2, ctx2 = (torch.cat([a, a]) for a in (x, t, ctx))
    from ldmkit.train.diffusion import DiffusionTrainConfig

    fused = DiffusionTrainConfig.model_fields["fused_optimizer"].default
    opts = {"ldmkit": torch.optim.AdamW(models["ldmkit"][0].parameters(), lr=1e-4, fused=fused or None),
            "diffusers": torch.optim.AdamW(models["diffusers"][0].parameters(), lr=1e-4)}
    plain = torch.optim.AdamW(models["ldmkit"][0].parameters(), lr=1e-4)  # the same optimizer as diffusers'

    def train_step(w: str, opt: torch.optim.Optimizer | None = None) -> float:
        model, call = models[w]
        opt = opt or opts[w]
        model.train()
        sync(args.device)
        t0 = time.perf_counter()
        loss = call(x, t, ctx).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(args.device)
        return time.perf_counter() - t0

    def sample_step(w: str) -> float:
        model, call = models[w]
        model.eval()
        sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            call(x2, t2, ctx2)
        sync(args.device)
        return time.perf_counter() - t0

    runs = {"train": {"ldmkit": lambda: train_step("ldmkit"), "ldmkit_plain_adamw": lambda: train_step("ldmkit", plain),
                      "diffusers": lambda: train_step("diffusers")},
            "sample": {"ldmkit": lambda: sample_step("ldmkit"), "diffusers": lambda: sample_step("diffusers")}}
    if args.device == "cpu":  # as sample(..., prepack=True) runs it: packed at the first step, kept for the rest
        models["ldmkit_prepack"] = build("ldmkit", args.device)  # the same weights (same seed)
        stack.enter_context(models["ldmkit_prepack"][0].prepacked())
        runs["sample"]["ldmkit_prepack"] = lambda: sample_step("ldmkit_prepack")
    compiled = None
    if args.device == "cpu" and args.compile:  # as sample(..., compile=True) runs it: compiled at the first step
        models["ldmkit_compiled"] = build("ldmkit", args.device)
        compiled = stack.enter_context(models["ldmkit_compiled"][0].compiled())
        runs["sample"]["ldmkit_compiled"] = lambda: sample_step("ldmkit_compiled")
    times: dict[str, dict[str, list[float]]] = {k: {w: [] for w in fns} for k, fns in runs.items()}
    for kind, fns in runs.items():
        for fn in fns.values():  # warm-up
            fn()
            fn()
        for r in range(args.repeats):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for w in order:
                times[kind][w].append(fns[w]())
    stack.close()  # the prepacked model's packs are dropped; the compiled model runs eagerly again
    if compiled is not None:
        if compiled.failed:
            raise SystemExit(f"torch.compile failed: {compiled.failed}")
        print(f"compiled the UNet in {compiled.seconds:.1f} s")
    med = {k: {w: statistics.median(v) for w, v in d.items()} for k, d in times.items()}
    for k in med:
        print(f"{k:<6} step: " + "  ".join(f"{w} {v * 1000:.1f} ms" for w, v in med[k].items()))

    memory = {}
    if args.device == "cuda":
        for w, (model, call) in models.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            train_step(w)
            memory[w] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    else:
        for w in ("ldmkit", "diffusers"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", w, "--batch", str(args.batch),
                                  "--latent", str(args.latent)], capture_output=True, text=True, check=True)
            memory[w] = round(int(out.stdout.strip().splitlines()[-1]) / 1024, 1)
    print(f"peak memory of a train step (MiB): ldmkit {memory['ldmkit']}  diffusers {memory['diffusers']}")
    import diffusers

    print(json.dumps({
        "benchmark": "unet_vs_diffusers", "device": args.device, "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__, "omp_wait": ldmkit.WAIT_POLICY, "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads(),
        "config": {**CONFIG, "context_dim": CONTEXT_DIM, "context_tokens": CONTEXT_TOKENS, "batch": args.batch,
                   "latent": [LATENT_CHANNELS, args.latent, args.latent]},
        "parameters": params,
        "train_step_ms": {w: round(v * 1000, 2) for w, v in med["train"].items()},
        "sample_step_ms": {w: round(v * 1000, 2) for w, v in med["sample"].items()},
        "ldmkit_fused_optimizer": fused,
        "train_step_ratio": round(med["train"]["diffusers"] / med["train"]["ldmkit"], 3),
        "train_step_ratio_same_optimizer": round(med["train"]["diffusers"] / med["train"]["ldmkit_plain_adamw"], 3),
        "sample_step_ratio": round(med["sample"]["diffusers"] / med["sample"]["ldmkit"], 3),
        "sample_step_ratio_prepack": (round(med["sample"]["diffusers"] / med["sample"]["ldmkit_prepack"], 3)
                                      if "ldmkit_prepack" in med["sample"] else None),
        "sample_step_ratio_compiled": (round(med["sample"]["diffusers"] / med["sample"]["ldmkit_compiled"], 3)
                                       if "ldmkit_compiled" in med["sample"] else None),
        "compile_s": round(compiled.seconds, 1) if compiled is not None else None,
        "peak_memory_mib": memory,
    }))


if __name__ == "__main__":
    main()
