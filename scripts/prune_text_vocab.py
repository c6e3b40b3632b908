"""Shrink a trained text-conditioned model: keep only the token embedding rows its data uses.

A text conditioner trained from scratch holds 49,408 CLIP BPE embedding rows, but the captions it was
trained on use a few dozen; the other rows are the random initialization (12.6 MB at width 128 in
float16). This writes a copy of the model whose text conditioners have a pruned ``vocabulary`` (the BPE ids
found in the captions of the given data splits) and checks that the copy encodes every one of those
captions exactly as the original does. Captions with other tokens are then refused with an error that
lists the words the model knows.

Usage: python scripts/prune_text_vocab.py MODEL.safetensors OUT.safetensors --data shapes:train-text
       [--data shapes:eval ...] [--n 20000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ldmkit.data import load_dataset
from ldmkit.fields import sample_value
from ldmkit.models.ldm import load_ldm
from ldmkit.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint


#: Config fields pruning may change (a pretrained tower is also detached from its file: see prune_vocabulary).
PRUNED_FIELDS = {"vocabulary", "vocab_size", "pretrained", "allow_pickle", "causal", "trainable"}


def captions(specs: list[str], key: str, n: int) -> list[str]:
    found: set[str] = set()
    for spec in specs:
        name, _, split = spec.partition(":")
        data = load_dataset(name, split=split or "train")
        for i in range(min(n, len(data))):
            value = sample_value(data[i], key)
            if isinstance(value, str):
                found.add(value)
    return sorted(found)


def main() -> None:
    from ldmkit_text import TextConfig, caption_token_ids, prune_vocabulary

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--data", action="append", required=True, help="NAME:SPLIT whose captions the model must keep")
    p.add_argument("--n", type=int, default=20000, help="samples read per split (default 20000)")
    p.add_argument("--reference-autoencoder", action="store_true",
                   help="also replace the bundled zoo autoencoder by a reference (name + digest; see save_ldm)")
    args = p.parse_args()

    meta = read_metadata(args.model)
    config = json.loads(meta["ldmkit.config"])
    tensors = dict(load_checkpoint(args.model).tensors)
    texts: dict[str, list[str]] = {}
    for i, cond in enumerate(config["conditioning"]["conditioners"]):
        if cond.get("type") != "text":
            continue
        cfg = TextConfig.model_validate(cond)
        name = cfg.instance_name  # the stack's name for it
        prefix = f"stack.conditioners.{name}."
        texts[name] = captions(args.data, cfg.key, args.n)
        keep = caption_token_ids(texts[name])
        new_cfg, new_state = prune_vocabulary(cfg, {k: v for k, v in tensors.items() if k.startswith(prefix)}, keep, prefix)
        tensors.update(new_state)
        config["conditioning"]["conditioners"][i] = {**cond, **new_cfg.model_dump(include=PRUNED_FIELDS)}
        print(f"{name}: {len(texts[name])} distinct captions use {len(keep)} of {cfg.vocab_size} tokens")
    if not texts:
        raise SystemExit(f"{args.model} has no text conditioner")
    save_checkpoint(args.out, tensors, {**meta, "ldmkit.config": json.dumps(config)})

    before, after = load_ldm(args.model), load_ldm(args.out)
    with torch.inference_mode():
        for name, caps in texts.items():
            a = before.stack.conditioners[name].encode(caps)
            b = after.stack.conditioners[name].encode(caps)
            if not (torch.equal(a.value, b.value) and torch.equal(a.mask, b.mask)):
                raise SystemExit(f"{name}: the pruned model encodes the captions differently")
            a, b = before.stack.conditioners[name].null(1), after.stack.conditioners[name].null(1)
            if not torch.equal(a.value, b.value):
                raise SystemExit(f"{name}: the pruned model's null differs")
    if args.reference_autoencoder:
        from ldmkit.models.ldm import save_ldm

        half = any(v.dtype == torch.float16 for v in tensors.values())
        extra = {k: v for k, v in meta.items() if k == "ldmkit.train_steps"}
        save_ldm(after, args.out, dtype="float16" if half else "float32", extra_metadata=extra, bundle_autoencoder=False)
        again = load_ldm(args.out)
        with torch.inference_mode():
            for name, caps in texts.items():
                if not torch.equal(after.stack.conditioners[name].encode(caps).value,
                                   again.stack.conditioners[name].encode(caps).value):
                    raise SystemExit(f"{name}: the copy referencing its autoencoder encodes differently")
        print(f"the autoencoder is referenced ({after.config.autoencoder}), not bundled")
    mb = lambda path: path.stat().st_size / 1e6  # noqa: E731
    print(f"{args.out}: {mb(args.model):.1f} MB -> {mb(args.out):.1f} MB; every caption encodes identically")


if __name__ == "__main__":
    main()
