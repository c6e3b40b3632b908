"""The downsampling-factor trade-off, measured: brief KL trainings at several f, same budget each.

Usage: python scripts/f_tradeoff.py [--f 2 4 8 16] [--steps 400] [--out runs/f-tradeoff]

Each run takes configs/autoencoder/shapes-kl-f4.yaml and changes only ch_mult (f = 2^(len-1)), the
step count and the GAN start (after the end: a reconstruction-only comparison), then scores the result
with `ldmkit eval MODEL --suite recon-shapes --n 256 --json`. Prints a markdown table: f, latent shape,
compression (pixels*3 / latent elements), PSNR, SSIM, object F1, minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--f", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default="runs/f-tradeoff")
    args = p.parse_args()
    from ldmkit.config import load_config
    from ldmkit.train.autoencoder import AutoencoderTrainConfig, train_autoencoder

    base = yaml.safe_load((REPO / "configs/autoencoder/shapes-kl-f4.yaml").read_text())
    rows = []
    for f in args.f:
        levels = f.bit_length()  # f = 2^(levels-1)
        recipe = dict(base, steps=args.steps, disc_start=args.steps + 1, warmup_steps=min(100, args.steps // 4),
                      out_dir=f"{args.out}/f{f}", image_every=args.steps, ckpt_every=args.steps, num_threads=1)
        recipe["model"] = dict(base["model"], ch_mult=[1] + [2] * (levels - 1))
        cfg = load_config(recipe, AutoencoderTrainConfig)
        out = Path(cfg.out_dir)
        t0 = time.time()
        if not (out / "model.safetensors").is_file():
            train_autoencoder(cfg, resume=(out / "last.safetensors").is_file(), progress=False)
        minutes = (time.time() - t0) / 60
        res = subprocess.run([sys.executable, "-m", "ldmkit.cli", "eval", str(out / "model.safetensors"),
                              "--suite", "recon-shapes", "--n", "256", "--json"], capture_output=True, text=True, check=True)
        m = json.loads(res.stdout)["metrics"]
        side = 32 // f
        latent = side * side * cfg.model.embed_dim
        rows.append((f, f"{side}x{side}x{cfg.model.embed_dim}", 32 * 32 * 3 / latent, m["psnr"], m["ssim"], m["object_f1"], minutes))
        print(json.dumps({"f": f, **m, "minutes": round(minutes, 1)}), flush=True)
    print("\n| f | latent | compression | PSNR (dB) | SSIM | object F1 | train min |\n|---|---|---|---|---|---|---|")
    for f, lat, comp, psnr, ssim, of1, mins in rows:
        print(f"| {f} | {lat} | {comp:.0f}x | {psnr:.2f} | {ssim:.3f} | {of1:.3f} | {mins:.1f} |")


if __name__ == "__main__":
    main()
