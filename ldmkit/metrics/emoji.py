"""Retrieval for text-to-emoji: does a generated image pick out the emoji its caption names?

There is no scene to parse in an emoji, so fidelity is measured by retrieval among the held-out emoji:
each generated image is compared with the ``n`` real eval emoji, and it *retrieves* its own when that
one is the most similar (``retrieval_top1``; ``retrieval_top5`` within the five most similar; chance is
``1/n`` and ``5/n``). ``mean_rank`` is the own emoji's average rank (1 = best, chance ``(n+1)/2``).

The feature space (:func:`emoji_features`), chosen for what a 32×32 emoji is told apart by — its
silhouette on the white ground and its colours — and nothing learned, so it cannot be gamed by, or
share the blind spots of, the model under test:

- an 8×8 thumbnail (area average) of the image, minus white, so the ground contributes nothing;
- a 4×4×4 joint RGB histogram of the non-white pixels (a pixel counts as ground when all three
  channels are above 240), normalized to sum 1;

each part L2-normalized and weighted equally; similarity is the cosine. Measured on the 134 held-out
emoji at 32×32 (``tests/test_evaluate.py`` shows each): the ground truth retrieves itself (the
reference, 1.0 by construction); near misses keep most of it — shifted by 2 pixels 1.0, blurred
(σ = 1 px) 0.955; another emoji's image scores 0.0 (the shuffled floor; top-5 0.022); a flat disc in
the emoji's own mean colour scores 0.157 (top-5 0.42) — what getting the colours right and nothing
else is worth, so a model must beat that to show it draws the emoji, not just its palette.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["emoji_features", "retrieval_scores"]

_GROUND = 240  # a pixel with every channel above this is white ground


def emoji_features(images: Sequence[np.ndarray]) -> np.ndarray:
    """``(n, 192 + 64)`` float64 features of ``H x W x 3`` uint8 images (H, W multiples of 8)."""
    feats = []
    for image in images:
        x = np.asarray(image, dtype=np.float64) / 255.0
        h, w = x.shape[:2]
        if h % 8 or w % 8 or x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"emoji features need H x W x 3 images with H, W multiples of 8; got {x.shape}")
        thumb = (1.0 - x).reshape(8, h // 8, 8, w // 8, 3).mean(axis=(1, 3)).ravel()
        pixels = np.asarray(image).reshape(-1, 3)
        ink = pixels[~(pixels > _GROUND).all(axis=1)]
        hist = np.zeros(64)
        if len(ink):
            bins = (ink // 64).astype(np.int64)
            np.add.at(hist, bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], 1.0)
            hist /= hist.sum()
        parts = [p / (np.linalg.norm(p) or 1.0) for p in (thumb, hist)]
        feats.append(np.concatenate(parts) / np.sqrt(2))
    return np.stack(feats)


def retrieval_scores(generated: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict[str, float]:
    """``retrieval_top1``, ``retrieval_top5``, ``mean_rank`` and ``chance_top1`` of ``generated[i]``
    retrieving ``truth[i]`` among all of ``truth`` (cosine similarity of :func:`emoji_features`)."""
    if len(generated) != len(truth) or len(truth) < 2:
        raise ValueError(f"need as many generated as true images (>= 2); got {len(generated)} and {len(truth)}")
    g, t = emoji_features(generated), emoji_features(truth)
    sim = g @ t.T
    own = np.diag(sim)[:, None]
    rank = 1 + (sim > own).sum(axis=1)  # ties go to the own emoji
    n = len(truth)
    return {"retrieval_top1": float((rank == 1).mean()), "retrieval_top5": float((rank <= 5).mean()),
            "mean_rank": float(rank.mean()), "chance_top1": 1.0 / n}
