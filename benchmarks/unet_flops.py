"""The UNet's achieved FLOP rate on the CPU, against the machine's measured 3x3-convolution peak.

Usage: python benchmarks/unet_flops.py [--model zoo:shapes-class] [--batch 128] [--train-batch 32]
       [--latent 8] [--threads 2] [--repeats 7] [--peak-batch 32] [--peak-channels 256] [--peak-size 32]
       [--no-compile]

1. FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; it counts the
   matrix products, convolutions and attention — with formulas added here for the CPU attention
   kernels it does not know — not the normalizations, activations and other elementwise work, which
   are memory-bound and cost time without counted FLOPs):
   - one forward of the model's UNet at ``--batch`` (default 128 = 64 images with classifier-free
     guidance's doubled batch) on ``--latent`` x ``--latent`` latents with the context, channels and
     vector the UNet is wired for (zoo:shapes-class: a 1-token context);
   - one training step's forward + backward at ``--train-batch`` (the loss is a mean square of the
     output; AdamW's elementwise update is neither counted nor timed).
2. Times, medians of ``--repeats`` runs with ``torch.set_num_threads(--threads)``: the forward under
   ``torch.inference_mode`` in float32 and under bfloat16 autocast (as ``sample(precision="bf16")``
   runs it), both also prepacked (``sample(prepack=True)``'s UNet, rated on the plain forward's FLOPs),
   the float32 forward compiled (``sample(compile=True)``'s UNet, compiled at the warm-up, also rated on
   the plain forward's FLOPs; ``--no-compile`` leaves it out), and the forward + backward in float32. Achieved GFLOP/s = counted FLOPs / time.
3. The peak: ``torch.nn.functional.conv2d`` on a large, well-shaped problem (input
   (``--peak-batch``, C, S, S), weight (C, C, 3, 3), padding 1; default C = 256, S = 32), float32 and
   bfloat16 tensors, under ``inference_mode``, same threads; GFLOP/s = 2·N·C·S²·C·9 / time. The UNet's
   fraction of peak is its GFLOP/s over the conv's, per precision (the train step against fp32).

The rows are interleaved in each repeat (in a rotating order), so a machine whose load changes affects
the UNet and the peak alike. The last line of output is one JSON object.
"""

from __future__ import annotations

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def unet_inputs(unet, batch: int, latent: int) -> tuple[tuple, dict]:
    """Random inputs of the shapes the UNet is wired for (context + mask, channels, vector as present)."""
    g = torch.Generator().manual_seed(0)
    w = unet.wiring
    x = torch.randn(batch, unet.latent_channels, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {}
    if w.context_dim:
        kwargs["context"] = torch.randn(batch, w.context_tokens, w.context_dim, generator=g)
        kwargs["context_mask"] = torch.ones(batch, w.context_tokens, dtype=torch.bool)
    if w.extra_in_channels:
        kwargs["channels"] = torch.randn(batch, w.extra_in_channels, latent, latent, generator=g)
    if w.vector_dim:
        kwargs["vector"] = torch.randn(batch, w.vector_dim, generator=g)
    return (x, t), kwargs


def flops_by_kind(counter: FlopCounterMode) -> dict[str, int]:
    """The counter's global totals grouped: convolution, attention (the fused kernels' QK^T and AV),
    matmul (mm, addmm, bmm: the linear layers, which include the transformers' projections)."""
    kinds: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = str(op)
        kind = "convolution" if "conv" in name else "attention" if "attention" in name else "matmul"
        kinds[kind] = kinds.get(kind, 0) + int(n)
    return kinds


def _cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU flash-attention kernels that ``scaled_dot_product_attention`` runs on the
    CPU (forward and backward): FlopCounterMode has formulas for the CUDA kernels only, so without these
    every attention product would count as zero here (the same formulas as its CUDA ones)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    formulas = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = fn
    return formulas


def count(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops()), flops_by_kind(counter)


def cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except OSError:
        pass
    return []


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:shapes-class", help="a latent diffusion model (zoo name or file); its UNet is measured")
    p.add_argument("--batch", type=int, default=128, help="UNet batch of the forward (128 = 64 images with guidance)")
    p.add_argument("--train-batch", type=int, default=32, help="batch of the forward + backward")
    p.add_argument("--latent", type=int, default=8, help="latent height and width")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--peak-batch", type=int, default=32)
    p.add_argument("--peak-channels", type=int, default=256)
    p.add_argument("--peak-size", type=int, default=32)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the compiled forward (its compile takes tens of seconds)")
    args = p.parse_args()
    for name in ("batch", "train_batch", "latent", "threads", "repeats", "peak_batch", "peak_channels", "peak_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)

    import ldmkit

    model = ldmkit.load(args.model)
    unet = getattr(model, "unet", None)
    if unet is None:
        p.error(f"{args.model} is not a latent diffusion model (no UNet)")
    if args.latent % unet.min_size_multiple:
        p.error(f"--latent must be a multiple of {unet.min_size_multiple} for this UNet")
    unet = unet.float().eval().requires_grad_(True)
    params = sum(q.numel() for q in unet.parameters())
    (x, t), kw = unet_inputs(unet, args.batch, args.latent)
    (xt, tt), kwt = unet_inputs(unet, args.train_batch, args.latent)
    n, c, s = args.peak_batch, args.peak_channels, args.peak_size
    g = torch.Generator().manual_seed(1)
    conv_x = torch.randn(n, c, s, s, generator=g)
    conv_w = torch.randn(c, c, 3, 3, generator=g) * (1.0 / (9 * c)) ** 0.5
    conv_x16, conv_w16 = conv_x.bfloat16(), conv_w.bfloat16()

    def forward(model, bf16: bool):
        """One guided-batch forward of ``model`` under inference mode, in float32 or under bf16 autocast."""
        def run() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x, t, **kw)
        return run

    packed_unet = copy.deepcopy(unet)  # sample(..., prepack=True)'s UNet: packed at the first call, kept after
    packing = contextlib.ExitStack()
    packing.enter_context(packed_unet.prepacked())
    forward_fp32, forward_bf16 = forward(unet, False), forward(unet, True)
    forward_fp32_prepack, forward_bf16_prepack = forward(packed_unet, False), forward(packed_unet, True)
    compiled = None
    if args.compile:  # sample(..., compile=True)'s UNet: compiled at the first (warm-up) call, kept after
        compiled_unet = copy.deepcopy(unet)
        compiled = packing.enter_context(compiled_unet.compiled())

    def train_fp32() -> None:
        unet.train()
        try:
            unet(xt, tt, **kwt).pow(2).mean().backward()
        finally:
            unet.zero_grad(set_to_none=True)
            unet.eval()

    def conv_fp32() -> None:
        with torch.inference_mode():
            F.conv2d(conv_x, conv_w, padding=1)

    def conv_bf16() -> None:
        with torch.inference_mode():
            F.conv2d(conv_x16, conv_w16, padding=1)

    rows = {"forward_fp32": forward_fp32, "forward_bf16": forward_bf16, "forward_fp32_prepack": forward_fp32_prepack,
            "forward_bf16_prepack": forward_bf16_prepack, "train_fp32": train_fp32,
            "conv_fp32": conv_fp32, "conv_bf16": conv_bf16}
    if compiled is not None:
        rows["forward_fp32_compiled"] = forward(compiled_unet, False)
    flops: dict[str, int] = {}
    breakdown: dict[str, dict[str, int]] = {}
    for name in ("forward_fp32", "forward_bf16", "train_fp32"):
        flops[name], breakdown[name] = count(rows[name])
    # the prepacked UNet is the same network: its rate is counted on the plain forward's FLOPs (with one context
    # token it skips the queries' work, which this count then includes: a rate for the network, not the kernels)
    flops["forward_fp32_prepack"] = flops["forward_bf16_prepack"] = flops["forward_fp32_compiled"] = flops["forward_fp32"]
    conv_formula = 2 * n * c * s * s * c * 9
    flops["conv_fp32"] = flops["conv_bf16"] = conv_formula
    counted_conv, _ = count(conv_fp32)
    if counted_conv != conv_formula:  # the two definitions of a conv's FLOPs must agree
        raise SystemExit(f"FlopCounterMode counts {counted_conv:,} FLOPs for the peak conv, the formula {conv_formula:,}")
    print(f"UNet of {args.model}: {params:,} parameters, wiring {unet.wiring.as_dict()}")
    print(f"FLOPs: forward (batch {args.batch}, {args.latent}x{args.latent}) {flops['forward_fp32'] / 1e9:.3f} G "
          f"{ {k: round(v / 1e9, 3) for k, v in breakdown['forward_fp32'].items()} }; forward + backward "
          f"(batch {args.train_batch}) {flops['train_fp32'] / 1e9:.3f} G; peak conv {conv_formula / 1e9:.2f} G")

    times: dict[str, list[float]] = {k: [] for k in rows}
    names = list(rows)
    for name in names:  # warm-up (one-time kernel selection, allocations)
        rows[name]()
        rows[name]()
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - t0)
    packing.close()
    if compiled is not None and compiled.failed:
        raise SystemExit(f"torch.compile failed: {compiled.failed}")
    med = {k: statistics.median(v) for k, v in times.items()}
    gflops = {k: flops[k] / med[k] / 1e9 for k in rows}
    fraction = {
        "forward_fp32": gflops["forward_fp32"] / gflops["conv_fp32"],
        "forward_bf16": gflops["forward_bf16"] / gflops["conv_bf16"],
        "forward_fp32_prepack": gflops["forward_fp32_prepack"] / gflops["conv_fp32"],
        "forward_bf16_prepack": gflops["forward_bf16_prepack"] / gflops["conv_bf16"],
        "train_fp32": gflops["train_fp32"] / gflops["conv_fp32"],
    }
    if compiled is not None:
        fraction["forward_fp32_compiled"] = gflops["forward_fp32_compiled"] / gflops["conv_fp32"]
    for k in rows:
        extra = f"  {fraction[k]:.1%} of the {k.split('_')[1]} conv peak" if k in fraction else ""
        print(f"{k:<21} {med[k] * 1000:9.2f} ms  {gflops[k]:8.1f} GFLOP/s{extra}")

    print(json.dumps({
        "benchmark": "unet_flops", "model": args.model, "device": "cpu", "cpu": cpu_name(), "cpu_flags": cpu_flags(),
        "machine": platform.machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats, "unet_parameters": params, "wiring": unet.wiring.as_dict(),
        "batch": args.batch, "train_batch": args.train_batch, "latent": [unet.latent_channels, args.latent, args.latent],
        "peak_conv": {"input": [n, c, s, s], "weight": [c, c, 3, 3], "padding": 1},
        "gflop": {k: round(v / 1e9, 4) for k, v in flops.items()},
        "gflop_by_kind": {k: {kind: round(v / 1e9, 4) for kind, v in b.items()} for k, b in breakdown.items()},
        "time_ms": {k: round(v * 1000, 3) for k, v in med.items()},
        "gflops_per_s": {k: round(v, 2) for k, v in gflops.items()},
        "fraction_of_peak": {k: round(v, 4) for k, v in fraction.items()},
        "compile_s": round(compiled.seconds, 1) if compiled is not None else None,
    }))


if __name__ == "__main__":
    main()
