"""The paper's central claim, measured: the same UNet in pixel space versus on f=4 latents.

Usage: python benchmarks/latent_vs_pixel.py [--budget 40] [--batch 16] [--n 64] [--steps 20] [--autoencoder zoo:shapes-kl-f4]

Both models are unconditional LatentDiffusion models with the same UNet configuration on 32x32
shapes-world images: one on the 32x32x3 pixels (no autoencoder, f = 1), one on the 8x8x3 latents of
the zoo's KL-f4 autoencoder. Reported:

- ``train_speedup``: pixel train-step time / latent train-step time, the latent step *including*
  encoding its batch (``train_speedup_cached`` leaves encoding out, as latent caching does);
- ``sample_speedup``: pixel / latent time to sample 8 images with DDIM (``--steps``), decoding included;
- quality in the same wall-clock budget: each model trains for ``--budget`` seconds, then ``--n``
  unconditional samples are scored with the ``shapes-uncond`` suite (``valid_scene_rate``, ``fd``).

Timings are medians of paired, interleaved runs. The last line of output is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see ldmkit/__init__.py

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
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps for sampling")
    p.add_argument("--n", type=int, default=64, help="samples scored per model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--autoencoder", default="zoo:shapes-kl-f4")
    args = p.parse_args()
    from ldmkit.data.shapes import ShapesWorld
    from ldmkit.evaluate import run_suite
    from ldmkit.models.ldm import images_to_tensor, tensor_to_images

    world = ShapesWorld("train", size=32, seed=0)
    images = images_to_tensor([world[i].image for i in range(4096)])
    models = {k: build(k, args.autoencoder) for k in ("pixel", "latent")}
    opts = {k: torch.optim.AdamW(m.trainable_parameters(), lr=5e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)

    def step(kind: str, encode: bool = True) -> float:
        model = models[kind].train()
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x = images[idx]
        t0 = time.perf_counter()
        z = model.encode_images(x) if encode or kind == "pixel" else None
        t1 = time.perf_counter()
        if z is None:
            z = model.encode_images(x)
        loss = model.loss(z, {}, generator=g)
        opts[kind].zero_grad()
        loss.backward()
        opts[kind].step()
        return time.perf_counter() - t0 - (0.0 if encode else t1 - t0)

    train = {"pixel": [], "latent": [], "latent_cached": []}
    for k in ("pixel", "latent"):
        step(k)
    for r in range(args.repeats):
        for k in (("pixel", "latent") if r % 2 == 0 else ("latent", "pixel")):
            train[k].append(step(k))
        train["latent_cached"].append(step("latent", encode=False))
    train_med = {k: statistics.median(v) for k, v in train.items()}

    def sample(kind: str) -> float:
        t0 = time.perf_counter()
        models[kind].eval().sample(n=8, steps=args.steps, seed=0)
        return time.perf_counter() - t0

    samp = {"pixel": [], "latent": []}
    for r in range(max(2, args.repeats // 2)):
        for k in (("pixel", "latent") if r % 2 == 0 else ("latent", "pixel")):
            samp[k].append(sample(k))
    samp_med = {k: statistics.median(v) for k, v in samp.items()}
    print(f"train step: pixel {train_med['pixel']:.3f}s  latent {train_med['latent']:.3f}s (cached {train_med['latent_cached']:.3f}s)")
    print(f"sample 8 (DDIM-{args.steps}, decode incl.): pixel {samp_med['pixel']:.2f}s  latent {samp_med['latent']:.2f}s")

    quality = {}
    for kind in ("pixel", "latent"):
        m = models[kind]
        steps, t_end = 0, time.perf_counter() + args.budget
        while time.perf_counter() < t_end:
            step(kind)
            steps += 1

        def generate(conds, m=m):
            return list(tensor_to_images(m.eval().sample(n=len(conds), steps=args.steps, seed=1)))

        metrics = run_suite("shapes-uncond", n=args.n, seed=0, mode="model", generate=generate)
        quality[kind] = {"train_steps_in_budget": steps + args.repeats + 1, **{k: round(v, 4) for k, v in metrics.items()}}
        print(f"{kind}: {quality[kind]}")
    print(json.dumps({
        "benchmark": "latent_vs_pixel", "image_size": 32, "unet": UNET, "batch": args.batch,
        "autoencoder": args.autoencoder, "torch_threads": torch.get_num_threads(),
        "train_step_s": {k: round(v, 4) for k, v in train_med.items()},
        "sample_8_s": {k: round(v, 3) for k, v in samp_med.items()},
        "train_speedup": round(train_med["pixel"] / train_med["latent"], 2),
        "train_speedup_cached": round(train_med["pixel"] / train_med["latent_cached"], 2),
        "sample_speedup": round(samp_med["pixel"] / samp_med["latent"], 2),
        "budget_s": args.budget, "sample_steps": args.steps, "quality": quality,
    }))


if __name__ == "__main__":
    main()
