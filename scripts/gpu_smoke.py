"""CUDA smoke test: the pieces that touch the device, run on a GPU. Usage: python scripts/gpu_smoke.py OUT_DIR

Trains a class-conditional LDM (the zoo recipe's model, zoo:shapes-kl-f4 first stage) for a few
steps on the GPU in fp32 and bf16, checks it resumes, samples with per-conditioner guidance and two
samplers (and once more from a CUDA graph, which must give the same images), checks the first stage gives
the same reconstruction on GPU and CPU, and prints one JSON object as its last line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    out = Path(sys.argv[1])
    assert torch.cuda.is_available(), "no CUDA device"
    import ldmkit
    from ldmkit.config import load_config, load_yaml
    from ldmkit.models.ldm import images_to_tensor, tensor_to_images
    from ldmkit.train.diffusion import DiffusionTrainConfig, train_diffusion

    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    recipe = load_yaml(Path(__file__).resolve().parent.parent / "configs/ldm/shapes-class.yaml")
    for precision in ("fp32", "bf16"):
        cfg = load_config({**recipe, "steps": 60, "batch_size": 64, "data": {"name": "shapes", "cache_size": 2048},
                           "out_dir": str(out / f"run-{precision}"), "precision": precision, "image_every": 60,
                           "ckpt_every": 30, "log_every": 20, "num_threads": None}, DiffusionTrainConfig)
        t0 = time.perf_counter()
        train_diffusion(cfg, progress=False, stop_after=30)
        path = train_diffusion(cfg, resume=True, progress=False)
        logs = [json.loads(x) for x in (out / f"run-{precision}/log.jsonl").read_text().splitlines()]
        steps = [r for r in logs if "loss" in r]
        result[f"train_{precision}"] = {"seconds": round(time.perf_counter() - t0, 1), "first_loss": steps[0]["loss"],
                                        "last_loss": steps[-1]["loss"], "sec_per_step": steps[-1]["sec_per_step"]}
    model = ldmkit.load(path, device="cuda")
    assert next(model.unet.parameters()).is_cuda
    for sampler in ("ddim", "dpmpp_2m"):
        t0 = time.perf_counter()
        imgs = model.sample({"label": list(range(16))}, sampler=sampler, steps=20, guidance={"class": 3.0}, seed=0)
        torch.cuda.synchronize()
        result[f"sample_{sampler}_16_images_s"] = round(time.perf_counter() - t0, 2)
        assert imgs.is_cuda and imgs.shape == (16, 3, 32, 32) and torch.isfinite(imgs).all()
    t0 = time.perf_counter()
    graphed = model.sample({"label": list(range(16))}, sampler="dpmpp_2m", steps=20, guidance={"class": 3.0}, seed=0,
                           cuda_graph=True)
    torch.cuda.synchronize()
    result["sample_dpmpp_2m_16_images_cuda_graph_s"] = round(time.perf_counter() - t0, 2)
    result["cuda_graph_max_abs_diff"] = (graphed - imgs).abs().max().item()
    assert result["cuda_graph_max_abs_diff"] < 1e-4, result["cuda_graph_max_abs_diff"]
    from PIL import Image

    Image.fromarray(tensor_to_images(imgs).reshape(2, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(64, 256, 3)).save(out / "samples.png")
    ae_gpu, ae_cpu = ldmkit.load("zoo:shapes-kl-f4", device="cuda"), ldmkit.load("zoo:shapes-kl-f4")
    from ldmkit.data.shapes import ShapesWorld

    x = images_to_tensor([ShapesWorld("eval")[i].image for i in range(32)])
    with torch.inference_mode():
        diff = (ae_gpu.reconstruct(x.cuda()).cpu() - ae_cpu.reconstruct(x)).abs().max().item()
    result["ae_gpu_vs_cpu_max_abs_diff"] = diff
    assert diff < 1e-2, diff
    print(json.dumps(result))


if __name__ == "__main__":
    main()
