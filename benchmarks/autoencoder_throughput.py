"""First-stage throughput: images/s for encode and decode at 32x32 and 256x256.

Usage: python benchmarks/autoencoder_throughput.py [--model zoo:shapes-kl-f4] [--device cpu|cuda] [--repeats 5]

The model defaults to the zoo's shapes-kl-f4 (or, when the zoo is empty, a fresh model built from
configs/autoencoder/shapes-kl-f4.yaml — weights do not change the cost). It is fully convolutional, so
the same weights run at 256x256. Each figure is the median over ``--repeats`` timed runs after a
warm-up, under ``torch.inference_mode``. The last line of output is one JSON object.
"""

from __future__ import annotations

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import json  # noqa: E402
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_model(ref: str, device: str):
    from ldmkit.zoo import list_zoo

    name = ref.removeprefix("zoo:")
    if ref.startswith("zoo:") and name not in list_zoo():
        import yaml

        from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig

        cfg = yaml.safe_load((REPO / f"configs/autoencoder/{name}.yaml").read_text())["model"]
        return Autoencoder(AutoencoderConfig(**cfg)).to(device).eval(), f"{ref} (untrained, zoo entry missing)"
    import ldmkit

    return ldmkit.load(ref, device=device), ref


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:shapes-kl-f4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, label = load_model(args.model, args.device)
    results = {}
    with torch.inference_mode():
        for size, batch in ((32, 256), (256, 4 if args.device == "cpu" else 64)):
            x = torch.rand(batch, 3, size, size, device=args.device) * 2 - 1
            z = model.encode(x)
            enc = timed(lambda: model.encode(x), args.device, args.repeats)
            dec = timed(lambda: model.decode(z), args.device, args.repeats)
            results[f"encode_{size}_img_per_s"] = round(batch / enc, 1)
            results[f"decode_{size}_img_per_s"] = round(batch / dec, 1)
            print(f"{size}x{size} batch {batch}: encode {batch / enc:.1f} img/s, decode {batch / dec:.1f} img/s")
    print(json.dumps({"benchmark": "autoencoder_throughput", "model": label, "device": args.device,
                      "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                      "parameters": sum(p.numel() for p in model.parameters()), **results}))


if __name__ == "__main__":
    main()
