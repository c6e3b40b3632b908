"""Pretrain a text tower on the shapes world contrastively (CLIP with hard negatives), for the text plugin.

Usage: python scripts/pretrain_text_tower.py OUT.safetensors [--steps 3000] [--batch 256] [--n 20000]
                                              [--width 128] [--layers 3] [--heads 4] [--context-length 16]

Why: a text tower trained from scratch through the diffusion loss alone learns one-object captions
but not which colour goes with which shape, nor the relation (docs/conditioners.md). Large text-to-image
models condition on a pretrained, frozen text encoder instead (Stable Diffusion: CLIP; Imagen: T5, whose
size mattered more than the UNet's). This trains one on the shapes world's own image-caption pairs
(split ``train-text``: the held-out (colour, shape) pairs are never seen): CLIP's symmetric InfoNCE
loss (Radford et al. 2021) between a small CNN image encoder and the text plugin's bidirectional
``TextTransformer`` (mean-pooled over the caption's tokens, so every token's feature is trained), with
one **hard negative** caption per image (NegCLIP, Yuksekgonul et al. 2023, "When and why vision-language
models behave like bags-of-words"): the true caption with its colours or shapes swapped between the
two objects, the relation reversed, or one word (colour, shape, size) changed. Contrastive models
without such negatives are known to ignore word order and binding.

It writes the text tower (keys ``text.*``, as open_clip's ``CustomTextCLIP``; safetensors, the settings
and the measured scores in the metadata) for the plugin's ``pretrained:`` option (set ``causal: false``,
as it was trained), and prints, on the eval and eval-heldout splits: image-to-caption retrieval top-1
among 256 captions, and hard-negative accuracy (the true caption beats its perturbed copy), overall
and per perturbation kind.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ldmkit.data import load_dataset
from ldmkit.data.shapes import COLOURS, RELATIONS, SHAPES, SIZES, parse_caption

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
KINDS = ("swap_colours", "swap_shapes", "reverse_relation", "colour", "shape", "size")


def _write(objects: list[dict], relation: str | None) -> str:
    words = [" ".join(w for w in ("a", o["size"], o["colour"], o["shape"]) if w) for o in objects]
    return words[0] if relation is None else f"{words[0]} {relation} {words[1]}"


def hard_negative(caption: str, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str]:
    """A caption that differs from ``caption`` in one way (returns it and the kind); ``kind`` forces one."""
    parsed = parse_caption(caption)
    objs, rel = [dict(o) for o in parsed["objects"]], parsed["relation"]
    two = len(objs) == 2
    kinds = [k for k in KINDS if k not in ("swap_colours", "swap_shapes", "reverse_relation") or two]
    if two:
        kinds = [k for k in kinds if not (k == "swap_colours" and objs[0]["colour"] == objs[1]["colour"])
                 and not (k == "swap_shapes" and objs[0]["shape"] == objs[1]["shape"])]
    if not any(o["size"] for o in objs):
        kinds.remove("size")
    kind = kind if kind in kinds else kinds[int(rng.integers(len(kinds)))]
    if kind == "swap_colours":
        objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
    elif kind == "swap_shapes":
        objs[0]["shape"], objs[1]["shape"] = objs[1]["shape"], objs[0]["shape"]
    elif kind == "reverse_relation":
        rel = OPPOSITE[rel]
    else:
        sized = [o for o in objs if o["size"]] if kind == "size" else objs
        o = sized[int(rng.integers(len(sized)))]
        choices = {"colour": COLOURS, "shape": SHAPES, "size": tuple(SIZES)}[kind]
        o[kind] = [c for c in choices if c != o[kind]][int(rng.integers(len(choices) - 1))]
    return _write(objs, rel), kind


class ImageEncoder(nn.Module):
    """32x32 RGB -> a d-vector; flattening the 4x4 map keeps where things are (relations need it)."""

    def __init__(self, dim: int, size: int = 32):
        super().__init__()
        chans = (3, 32, 64, 128, 128)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1),
                       nn.GroupNorm(8, chans[i + 1]), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128 * (size // 8) ** 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class TinyCLIP(nn.Module):
    def __init__(self, text: nn.Module, width: int, dim: int = 128):
        super().__init__()
        self.text = text
        self.image = ImageEncoder(dim)
        self.text_proj = nn.Linear(width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._ids: dict[str, list[int]] = {}  # captions repeat: tokenize each once

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = [self._ids.get(c) or self._ids.setdefault(c, self.text.validate_one(c, i)) for i, c in enumerate(captions)]
        out = self.text(self.text.collate(ids, torch.device("cpu")))
        mask = out.mask[..., None].to(out.value.dtype)
        pooled = (out.value * mask).sum(1) / mask.sum(1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def load(split: str, n: int) -> tuple[np.ndarray, list[str]]:
    data = load_dataset("shapes", split=split)
    scenes = [data[i] for i in tqdm(range(n), desc=f"shapes {split}", leave=False)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


@torch.no_grad()
def evaluate(model: TinyCLIP, images: np.ndarray, captions: list[str], seed: int = 1, group: int = 256) -> dict:
    """Retrieval top-1 (image -> its caption among ``group``) and hard-negative accuracy per kind."""
    model.eval()
    rng = np.random.default_rng(seed)
    top1, wins = [], {k: [] for k in KINDS}
    for s in range(0, len(captions) - group + 1, group):
        img = model.encode_image(to_tensor(images[s:s + group]))
        caps = captions[s:s + group]
        txt = model.encode_text(caps)
        top1.append((img @ txt.T).argmax(1).eq(torch.arange(group)).float().mean().item())
        negs = [hard_negative(c, rng) for c in caps]
        neg = model.encode_text([c for c, _ in negs])
        better = ((img * txt).sum(1) > (img * neg).sum(1)).tolist()
        for (_, kind), b in zip(negs, better):
            wins[kind].append(b)
    model.train()
    every = [b for v in wins.values() for b in v]
    return {"retrieval_top1": float(np.mean(top1)), "hard_negative_acc": float(np.mean(every)),
            **{f"hard_negative_acc_{k}": round(float(np.mean(v)), 4) for k, v in wins.items() if v}}


def main() -> None:
    from ldmkit_text import TextConditioner, TextConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n", type=int, default=20000, help="train-text scenes used")
    p.add_argument("--n-eval", type=int, default=2048, help="eval (and eval-heldout) scenes scored")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context-length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    settings = {"width": args.width, "layers": args.layers, "heads": args.heads,
                "context_length": args.context_length, "causal": False}
    text = TextConditioner(TextConfig(**settings), None)
    model = TinyCLIP(text, args.width)
    images, captions = load("train-text", args.n)
    evals = {split: load(split, args.n_eval) for split in ("eval", "eval-heldout")}
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    warmup = min(200, args.steps // 10)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="text tower", dynamic_ncols=True)
    log = open(args.out + ".log.jsonl", "w")
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.choice(len(captions), args.batch, replace=False)
        caps = [captions[i] for i in idx]
        negs = [hard_negative(c, rng)[0] for c in caps]
        img = model.encode_image(to_tensor(images[idx]))
        txt = model.encode_text(caps + negs)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T  # (B, 2B): each image against every caption and every hard negative
        target = torch.arange(args.batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : args.batch].T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "lr": lr}), file=log, flush=True)
    minutes = (time.perf_counter() - start) / 60
    scores = {split: evaluate(model, *data) for split, data in evals.items()}
    print(json.dumps({"minutes": round(minutes, 1), **scores}, indent=1))
    tensors = {f"text.{k}": v.detach().contiguous() for k, v in model.text.tower.state_dict().items()
               if v is not None}
    meta = {"ldmkit.text_tower": json.dumps(settings), "ldmkit.scores": json.dumps(scores),
            "ldmkit.recipe": json.dumps({k: v for k, v in vars(args).items() if k != "out"})}
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
