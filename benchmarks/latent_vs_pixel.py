"""The paper's central claim, measured: the same UNet in pixel space versus on f=4 latents.

Usage: python benchmarks/latent_vs_pixel.py [--budget 40] [--batch 64] [--batches 16 32] [--quality-batch 32]
       [--sample-batch 64] [--n 64] [--steps 20] [--autoencoder zoo:shapes-kl-f4] [--no-fused]

Both models are unconditional LatentDiffusion models with the same UNet configuration on 32x32
shapes-world images: one on the 32x32x3 pixels (no autoencoder, f = 1), one on the 8x8x3 latents of
the zoo's KL-f4 autoencoder. Reported:

- ``train_speedup``: pixel train-step time / latent train-step time, the latent step *including*
  encoding its batch (``train_speedup_cached`` leaves encoding out, as latent caching does);
- ``sample_speedup``: pixel / latent time to sample ``--sample-batch`` images in one batch with DDIM
  (``--steps``), decoding included;
- quality in the same wall-clock budget: each model trains for ``--budget`` seconds, then ``--n``
  unconditional samples are scored with the ``shapes-uncond`` suite (``valid_scene_rate``, ``fd``).

Timings are medians of paired, interleaved runs. The last line of output is one JSON object.

Batch sizes matter on a CPU: at small batches the 8x8 latent UNet is bound by per-operation overhead,
not arithmetic, so the ratio shrinks. The headline ``train_speedup`` is at batch 64 (``--batch``), and
``train_speedup_by_batch`` reports 16 and 32 (the zoo recipes' batch) beside it; sampling is timed on a
batch of 64 (``ldmkit eval``'s), and the equal-time quality runs train at batch 32.
"""

from __future__ import annotations

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

UNET = {"model_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_levels": [1], "num_heads": 4}


def build(kind: str, autoencoder_ref: str):
    from ldmkit.config import LatentDiffusionConfig
    from ldmkit.models.ldm import LatentDiffusion
    from ldmkit.train.diffusion import load_first_stage

    torch.manual_seed(0)
    if kind == "pixel":
        cfg = LatentDiffusionConfig(image_size=32, downsample_factor=1, latent_channels=3, unet=UNET)
        return LatentDiffusion(cfg, None)
    ae = load_first_stage(autoencoder_ref)
    cfg = LatentDiffusionConfig(image_size=32, autoencoder=autoencoder_ref, downsample_factor=ae.downsample_factor,
                                latent_channels=ae.latent_channels, unet=UNET)
    return LatentDiffusion(cfg, ae)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=40.0, help="training seconds per model for the quality comparison")
    p.add_argument("--batch", type=int, default=64, help="training batch of the headline train_speedup")
    p.add_argument("--batches", type=int, nargs="*", default=[16, 32],
                   help="further training batches whose ratios are also reported (train_speedup_by_batch)")
    p.add_argument("--quality-batch", type=int, default=32, help="training batch of the equal-time quality runs (the zoo's)")
    p.add_argument("--sample-batch", type=int, default=64, help="images sampled in one batch for the timing (ldmkit eval uses 64)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps for sampling")
    p.add_argument("--n", type=int, default=64, help="samples scored per model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--autoencoder", default="zoo:shapes-kl-f4")
    from ldmkit.train.diffusion import DiffusionTrainConfig

    p.add_argument("--fused", action=argparse.BooleanOptionalAction,
                   default=DiffusionTrainConfig.model_fields["fused_optimizer"].default,
                   help="AdamW(fused=True) on both sides (default: the trainer's fused_optimizer default); --no-fused: "
                        "torch's per-parameter AdamW")
    args = p.parse_args()
    from ldmkit.data.shapes import ShapesWorld
    from ldmkit.evaluate import run_suite
    from ldmkit.models.ldm import images_to_tensor, tensor_to_images

    world = ShapesWorld("train", size=32, seed=0)
    images = images_to_tensor([world[i].image for i in range(4096)])
    models = {k: build(k, args.autoencoder) for k in ("pixel", "latent")}
    opts = {k: torch.optim.AdamW(m.trainable_parameters(), lr=5e-4, fused=True if args.fused else None)
            for k, m in models.items()}
    g = torch.Generator().manual_seed(0)

    def step(kind: str, batch: int, encode: bool = True) -> float:
        """One optimizer step; the time includes encoding the batch unless ``encode=False`` (cached latents)."""
        model = models[kind].train()
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        z = None if encode or kind == "pixel" else model.encode_images(x)  # cached: encoded before the clock
        t0 = time.perf_counter()
        if z is None:
            z = model.encode_images(x)
        loss = model.loss(z, {}, generator=g)
        opts[kind].zero_grad()
        loss.backward()
        opts[kind].step()
        return time.perf_counter() - t0

    by_batch = {}
    for batch in sorted({args.batch, *args.batches}):
        train = {"pixel": [], "latent": [], "latent_cached": []}
        for k in ("pixel", "latent"):
            step(k, batch)
        for r in range(args.repeats):
            for k in (("pixel", "latent") if r % 2 == 0 else ("latent", "pixel")):
                train[k].append(step(k, batch))
            train["latent_cached"].append(step("latent", batch, encode=False))
        by_batch[batch] = {k: statistics.median(v) for k, v in train.items()}
        med = by_batch[batch]
        print(f"train step, batch {batch}: pixel {med['pixel']:.3f}s  latent {med['latent']:.3f}s "
              f"(cached {med['latent_cached']:.3f}s)  ratio {med['pixel'] / med['latent']:.2f}")
    train_med = by_batch[args.batch]

    def sample(kind: str) -> float:
        t0 = time.perf_counter()
        models[kind].eval().sample(n=args.sample_batch, steps=args.steps, seed=0)
        return time.perf_counter() - t0

    samp = {"pixel": [], "latent": []}
    for r in range(max(2, args.repeats // 2)):
        for k in (("pixel", "latent") if r % 2 == 0 else ("latent", "pixel")):
            samp[k].append(sample(k))
    samp_med = {k: statistics.median(v) for k, v in samp.items()}
    print(f"sample {args.sample_batch} (DDIM-{args.steps}, decode incl.): pixel {samp_med['pixel']:.2f}s  latent {samp_med['latent']:.2f}s")

    quality = {}
    for kind in ("pixel", "latent"):
        m = models[kind]
        steps, t_end = 0, time.perf_counter() + args.budget
        while time.perf_counter() < t_end:
            step(kind, args.quality_batch)
            steps += 1

        def generate(conds, m=m):
            return list(tensor_to_images(m.eval().sample(n=len(conds), steps=args.steps, seed=1)))

        metrics = run_suite("shapes-uncond", n=args.n, seed=0, mode="model", generate=generate)
        quality[kind] = {"train_steps_in_budget": steps + args.repeats + 1, **{k: round(v, 4) for k, v in metrics.items()}}
        print(f"{kind}: {quality[kind]}")
    print(json.dumps({
        "benchmark": "latent_vs_pixel", "image_size": 32, "unet": UNET, "batch": args.batch,
        "train_speedup_by_batch": {b: round(v["pixel"] / v["latent"], 2) for b, v in by_batch.items()},
        "train_speedup_cached_by_batch": {b: round(v["pixel"] / v["latent_cached"], 2) for b, v in by_batch.items()},
        "quality_batch": args.quality_batch,
        "autoencoder": args.autoencoder, "torch_threads": torch.get_num_threads(), "fused_optimizer": args.fused,
        "train_step_s": {k: round(v, 4) for k, v in train_med.items()},
        "sample_batch": args.sample_batch, "sample_s": {k: round(v, 3) for k, v in samp_med.items()},
        "train_speedup": round(train_med["pixel"] / train_med["latent"], 2),
        "train_speedup_cached": round(train_med["pixel"] / train_med["latent_cached"], 2),
        "sample_speedup": round(samp_med["pixel"] / samp_med["latent"], 2),
        "budget_s": args.budget, "sample_steps": args.steps, "quality": quality,
    }))


if __name__ == "__main__":
    main()
