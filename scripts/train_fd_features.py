"""Train the shapes-world feature network used by the ``fd`` metric (a few minutes on 2 CPU cores).

Usage: python scripts/train_fd_features.py [--steps 1500] [--out ldmkit/metrics/assets/shapes_features.safetensors]

Data: the first ``--scenes`` scenes of ``ShapesWorld("train", size=32, seed=0)``. Targets: multi-hot presence
of the 18 (shape, colour) classes (binary cross-entropy) and the class of the largest object (cross-entropy).
Adam, batch 128, learning rate 2e-3 with cosine decay, seed 0. Prints held-out accuracies on 2,000
``eval`` scenes and stores them, with the settings, in the safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from ldmkit.data.shapes import NUM_CLASSES, ShapesWorld
from ldmkit.metrics.features import WEIGHTS_PATH, ShapesFeatureNet, to_input


def make_data(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, presence targets and largest-object labels for the first ``n`` scenes of a split."""
    world = ShapesWorld(split, size=32, seed=0)
    images = np.empty((n, 32, 32, 3), np.uint8)
    presence = torch.zeros(n, NUM_CLASSES)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        s = world[i]
        images[i] = s.image
        for o in s.meta["objects"]:
            presence[i, o["class_id"]] = 1.0
        labels[i] = s.label
    return to_input(images), presence, labels


@torch.no_grad()
def accuracy(net: ShapesFeatureNet, x: torch.Tensor, presence: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    p_logits, l_logits = net(x)
    exact = ((p_logits > 0).float() == presence).all(1).float().mean().item()
    return {"presence_exact": exact, "largest_acc": (l_logits.argmax(1) == labels).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--scenes", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=str(WEIGHTS_PATH))
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    x, presence, labels = make_data("train", args.scenes)
    x_ev, presence_ev, labels_ev = make_data("eval", 2000)
    print(f"data: {args.scenes} train scenes in {time.time() - t0:.0f}s")

    net = ShapesFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(0, args.scenes, (args.batch,), generator=gen)
        p_logits, l_logits = net(x[idx])
        loss = F.binary_cross_entropy_with_logits(p_logits, presence[idx]) + F.cross_entropy(l_logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} {time.time() - t0:.0f}s")

    net.eval()
    acc = accuracy(net, x_ev, presence_ev, labels_ev)
    print("eval:", json.dumps(acc))
    meta = {"trained_by": "scripts/train_fd_features.py", "settings": json.dumps(vars(args)),
            "eval_accuracy": json.dumps(acc), "seconds": f"{time.time() - t0:.0f}"}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, args.out, metadata=meta)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
