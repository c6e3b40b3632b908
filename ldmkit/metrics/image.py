"""Image-level metrics: PSNR, SSIM, bicubic upsampling (the super-resolution baseline) and Fréchet distance.

All images are ``H x W x 3`` uint8. Batch functions take two equally long sequences and return the mean of
the per-image values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import linalg, ndimage

__all__ = [
    "PSNR_CAP", "psnr_image", "psnr", "ssim_image", "ssim", "bicubic_upsample", "frechet_distance", "fd",
]

#: PSNR of identical images (infinite) is reported as this many dB; every PSNR is capped at it.
PSNR_CAP = 100.0


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    if pred.dtype != np.uint8 or target.dtype != np.uint8:
        raise ValueError(f"pred and target must be uint8, got {pred.dtype} and {target.dtype}")
    return pred.astype(np.float64), target.astype(np.float64)


def psnr_image(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB (peak 255) of one image pair, over the pixels where ``mask`` (``H x W`` bool) is True
    if given; capped at :data:`PSNR_CAP`; NaN if the mask selects no pixel."""
    pred, target = _pair(pred, target)
    err = (pred - target) ** 2
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != err.shape[:2]:
            raise ValueError(f"mask must be {err.shape[:2]}, got {mask.shape}")
        if not mask.any():
            return float("nan")
        err = err[mask]
    mse = float(err.mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def psnr(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
         masks: Sequence[np.ndarray] | None = None) -> float:
    """Mean per-image PSNR (images whose mask is empty are skipped)."""
    if len(preds) != len(targets) or (masks is not None and len(masks) != len(preds)):
        raise ValueError("preds, targets (and masks) must have the same length")
    values = [psnr_image(p, t, None if masks is None else masks[i]) for i, (p, t) in enumerate(zip(preds, targets))]
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def ssim_image(pred: np.ndarray, target: np.ndarray) -> float:
    """SSIM of one RGB pair (Wang et al. 2004): Gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03,
    data range 255, per channel, averaged over channels and over pixels at least 5 from the border."""
    pred, target = _pair(pred, target)
    if min(pred.shape[:2]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11, got {pred.shape[:2]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(z, sigma=(1.5, 1.5, 0), truncate=3.5, mode="reflect")

    mu_p, mu_t = blur(pred), blur(target)
    var_p = blur(pred * pred) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    cov = blur(pred * target) - mu_p * mu_t
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return float(s[5:-5, 5:-5].mean())


def ssim(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Mean per-image SSIM."""
    if len(preds) != len(targets):
        raise ValueError("preds and targets must have the same length")
    return float(np.mean([ssim_image(p, t) for p, t in zip(preds, targets)]))


def bicubic_upsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic upsampling (PIL) of an ``h x w x 3`` uint8 image to ``size = (H, W)``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be h x w x 3 uint8, got {image.dtype} {image.shape}")
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N x D each, N >= 2):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    The matrix square root is ``scipy.linalg.sqrtm`` (real part); if it is not finite, both covariances
    get ``1e-6 * I`` added first. With few samples the estimate is biased upwards (the covariance of N
    samples is noisy; the bias shrinks roughly like 1/N), so only compare values at equal N.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be N x D arrays of equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular products (e.g. a constant feature) are expected and handled
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            eye = 1e-6 * np.eye(a.shape[1])
            root = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    root = np.real(root)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
    return max(value, 0.0)


def fd(images: Sequence[np.ndarray], reference: Sequence[np.ndarray] | np.ndarray) -> float:
    """Fréchet distance between ``images`` and ``reference`` in the shapes feature space
    (:func:`ldmkit.metrics.features.extract_features`); ``reference`` may be precomputed N x D features."""
    from ldmkit.metrics.features import extract_features

    ref = np.asarray(reference)
    ref_feats = ref if ref.ndim == 2 else extract_features(reference)
    return frechet_distance(extract_features(images), ref_feats)
