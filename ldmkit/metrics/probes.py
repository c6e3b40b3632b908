"""Should-fail probes for the shapes metrics: scenes the shapes world never draws (must fail) and mild
degradations of scenes it does draw (must pass). Used by tests/test_valid_scene.py and
tests/test_metrics.py (the evaluators' calibration) and by scripts/calibrate_recognisable.py.

A probe scene is drawn like a world scene (shaded grey background, objects in the size bands, kept apart
by the world's gaps) but its first object is the probe: a shape outside :data:`SHAPES` (drawn from a
signed distance, anti-aliased exactly as the world draws its own), a colour outside the palette, two
objects merged into one blob, or an object outside the size bands. 0-2 ordinary objects complete it.
"""

from __future__ import annotations

__all__ = ["WRONG_SHAPES", "OFF_PALETTE", "FAILING", "probe_scene", "paint", "rounded_square", "blur", "noise", "jpeg"]

import io
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from ldmkit.data.shapes import COLOURS, PALETTE, SHAPES, SIZES, shape_coverage

Sdf = Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (dx, dy, r) -> signed distance in pixels


def rounded_square(dx: np.ndarray, dy: np.ndarray, r: float, k: float = 0.45) -> np.ndarray:
    """Signed distance of a square of half side r whose corners are rounded with radius k r."""
    rc = k * r
    qx, qy = np.abs(dx) - (r - rc), np.abs(dy) - (r - rc)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - rc


def _dome(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """A half disc of radius r, flat side down, centred in its 2r x r box (placed in the lower half)."""
    dy = dy - r / 2
    return np.maximum(np.hypot(dx, dy) - r, dy)


def _teardrop(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """A disc of radius 0.6 r at the bottom with a point reaching the top of the box."""
    rd = 0.6 * r
    cy = r - rd
    disc = np.hypot(dx, dy - cy) - rd
    # the cone: tangent lines from the tip (0, -r) to the disc
    d = r + cy
    half = np.arcsin(rd / d)
    nx, ny = np.cos(half), np.sin(half)
    cone = np.maximum(np.maximum(np.abs(dx) * nx - (dy + r) * ny, dy - cy), -(dy + r))
    return np.minimum(disc, cone)


def _diamond(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2.0)


def _ellipse(dx: np.ndarray, dy: np.ndarray, r: float, aspect: float = 0.55) -> np.ndarray:
    a, b = r, aspect * r
    return (np.hypot(dx / a, dy / b) - 1.0) * b


def _world(shape: str) -> Sdf:
    def sdf(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
        return 0.5 - shape_coverage(shape, 0.0, 0.0, r, dx, dy)  # coverage = clip(0.5 - sdf) round-trips
    return sdf


WRONG_SHAPES: dict[str, Sdf] = {
    "rounded square": rounded_square, "dome": _dome, "teardrop": _teardrop, "diamond": _diamond,
    "ellipse": _ellipse,
}
OFF_PALETTE: dict[str, tuple[int, int, int] | None] = {
    "orange": (255, 140, 0), "grey": (170, 170, 170), "brown": (150, 90, 40),
    "between two colours": None,  # the midpoint of a random pair of palette colours
}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """The world's background: grey 90-120 with a +-5 tint per channel and a +-8 linear shade."""
    u = rng.random(6)
    base = 90.0 + 30.0 * u[0] + (10.0 * u[1:4] - 5.0)
    c = (np.arange(size) + 0.5) / size - 0.5
    return base + (16 * u[4] - 8) * c[None, :, None] + (16 * u[5] - 8) * c[:, None, None]


def paint(img: np.ndarray, sdf: Sdf, colour: np.ndarray, cx: float, cy: float, r: float) -> None:
    """Blend a shape given by its signed distance into ``img`` (float, H x W x 3) with the world's anti-aliasing."""
    pix = np.arange(img.shape[0], dtype=np.float64) + 0.5
    cov = np.clip(0.5 - sdf(pix[None, :] - cx, pix[:, None] - cy, r), 0.0, 1.0)
    img += cov[..., None] * (colour - img)


def _fits(box: tuple[float, float, float, float], boxes: list, size: int) -> bool:
    gap, margin = 0.07 * size, 0.03 * size
    x0, y0, x1, y1 = box
    if x0 < margin or y0 < margin or x1 > size - margin or y1 > size - margin:
        return False
    return all(x0 >= b[2] + gap or x1 + gap <= b[0] or y0 >= b[3] + gap or y1 + gap <= b[1] for b in boxes)


def _radius(rng: np.random.Generator, size: int) -> float:
    lo, hi = SIZES["small" if rng.random() < 0.5 else "large"]
    return size * (lo + (hi - lo) * rng.random())


def probe_scene(family: str, index: int, size: int = 32) -> np.ndarray:
    """Probe ``index`` of ``family`` (one of :data:`FAILING`), deterministic."""
    rng = np.random.default_rng([FAILING.index(family), index, 0x5EED])
    img = _background(rng, size)
    boxes: list[tuple[float, float, float, float]] = []
    ci = int(rng.integers(len(COLOURS)))
    colour = np.array(PALETTE[COLOURS[ci]], np.float64)
    r = _radius(rng, size)
    parts: list[tuple[Sdf, np.ndarray, float, float, float]] = []  # the probe, drawn in parts
    if family in WRONG_SHAPES:
        parts = [(WRONG_SHAPES[family], colour, 0.0, 0.0, r)]
    elif family in OFF_PALETTE:
        rgb = OFF_PALETTE[family]
        if rgb is None:
            a, b = rng.choice(len(COLOURS), 2, replace=False)
            rgb = tuple((np.array(PALETTE[COLOURS[a]]) + np.array(PALETTE[COLOURS[b]])) / 2)
        parts = [(_world(SHAPES[rng.integers(len(SHAPES))]), np.array(rgb, np.float64), 0.0, 0.0, r)]
    elif family in ("merged", "touching"):
        # two world objects whose boxes touch or overlap by up to a third: one blob (same colour) or two
        # objects in contact (two colours); the world keeps >= 7 % of the side between boxes
        r1, r2 = size * 0.16 * (0.7 + 0.6 * rng.random()), size * 0.12 * (0.7 + 0.6 * rng.random())
        ang = rng.uniform(0, 2 * np.pi)
        dist = (r1 + r2) * rng.uniform(0.7, 1.0)
        oi = ci if family == "merged" else (ci + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)
        other = np.array(PALETTE[COLOURS[oi]], np.float64)
        ox, oy = dist * np.cos(ang) / 2, dist * np.sin(ang) / 2
        parts = [(_world(SHAPES[rng.integers(3)]), colour, -ox, -oy, r1),
                 (_world(SHAPES[rng.integers(3)]), other, ox, oy, r2)]
        r = max(abs(ox) + r1, abs(oy) + r1, abs(ox) + r2, abs(oy) + r2)
    elif family == "tiny":
        r = rng.uniform(1.2, 1.8)  # a 2.4-3.6 px box
        parts = [(_world(SHAPES[rng.integers(3)]), colour, 0.0, 0.0, r)]
    elif family == "huge":
        r = size * rng.uniform(0.30, 0.40)  # far above the large band (0.18-0.22)
        parts = [(_world(SHAPES[rng.integers(3)]), colour, 0.0, 0.0, r)]
    elif family == "between sizes":
        r = size * rng.uniform(0.145, 0.165)  # the middle of the gap between the bands (0.13, 0.18)
        parts = [(_world(SHAPES[rng.integers(3)]), colour, 0.0, 0.0, r)]
    else:
        raise ValueError(family)
    lim = max(r, 1.0)
    cx, cy = rng.uniform(lim + 1, size - lim - 1, 2) if 2 * lim + 2 < size else (size / 2, size / 2)
    for sdf, rgb, ox, oy, pr in parts:
        paint(img, sdf, rgb, cx + ox, cy + oy, pr)
    boxes.append((cx - r, cy - r, cx + r, cy + r))
    for _ in range(int(rng.integers(3))):  # 0-2 ordinary objects where they fit
        for _try in range(30):
            rr = _radius(rng, size)
            x, y = rng.uniform(rr, size - rr, 2)
            if _fits((x - rr, y - rr, x + rr, y + rr), boxes, size):
                shape = _world(SHAPES[rng.integers(3)])
                paint(img, shape, np.array(PALETTE[COLOURS[rng.integers(6)]], float), x, y, rr)
                boxes.append((x - rr, y - rr, x + rr, y + rr))
                break
    return np.rint(img).clip(0, 255).astype(np.uint8)


FAILING: list[str] = [*WRONG_SHAPES, *OFF_PALETTE, "merged", "touching", "tiny", "huge", "between sizes"]


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.rint(ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0))).clip(0, 255).astype(np.uint8)


def noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    x = image + np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    return np.rint(x).clip(0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
    """A JPEG round trip (4:4:4, no chroma subsampling)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
