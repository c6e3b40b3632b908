"""Parse any RGB image back into shapes-world objects, and score generated images against their conditions.

The parser (:func:`parse_scene`) works in five steps:

1. **background**: pixels far (> 60) from every palette colour are background candidates; a plane per
   channel is fitted to them by least squares, refitted once without outliers (residual > 25);
2. **colour**: a pixel takes the nearest palette colour if that colour is nearer than the background
   and within :data:`COLOUR_TOLERANCE` of it (so a pixel at least half covered by an object);
3. **components**: 8-connected components per colour (``scipy.ndimage.label``); each object's
   *coverage* ``alpha`` is the pixel's projection onto the background -> colour segment, summed over the
   component dilated by two pixels; components with less coverage than :data:`MIN_AREA` (a fraction of
   the image area) are specks, not objects;
4. **shape**: for each shape, the size follows from the coverage mass (``area = k * r**2``) and the
   centre from its centroid; any spread beyond the sharp model's second moment is taken as Gaussian
   blur and applied to the model; the shape whose rendering best matches the observed coverage (least
   L1 misfit) wins, with ``confidence = 1 - misfit / mass``;
5. **box** is that best model's box (sub-pixel accurate, and unchanged in expectation by blur, which
   preserves mass and centroid); **size** is "small" or "large" by its side; **mask** is the component's
   pixels with ``alpha >= 1/2``;
6. **validity fields**: ``misfit``, each shape refitted over a grid of sizes (0.92-1.08 of the mass
   estimate) and Gaussian blurs (sigma 0-1.5 px), the object's shape's best misfit / mass;
   ``shape_margin``, the other shapes' best misfit minus it (how clearly the shape is recognised);
   ``colour_error``, the RGB distance between the least-squares colour of the object (pixel = background +
   alpha * (colour - background), blur-invariant) and its palette colour; ``extent``, the half-extent as a
   fraction of the image height.

A *valid* scene (:func:`scene_faults`, :func:`is_clean`, :func:`valid_scene_rate`) is one the world could
have drawn: 1-4 objects, no specks, almost no unexplained pixels, and every object a recognisable shape
(misfit and margin), a palette colour within a tight tolerance, inside a size band and apart from the others.
The thresholds are measured on world renders (clean, blurred by 0.5 px, noised by 3 grey levels,
JPEG-compressed at quality 95) next to the constants below; probes of what the world never draws
(rounded squares, teardrops, diamonds, orange or grey objects, merged objects, tiny or huge ones) fail.

Metric functions take the condition Samples (from :mod:`ldmkit.data.shapes`) and the generated images
(``H x W x 3`` uint8) and return floats; :mod:`ldmkit.evaluate` groups them into suites and
``docs/evaluation.md`` defines each one with its measured ceiling and floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ldmkit.data.base import Sample
from ldmkit.data.shapes import (
    AREA_FACTOR, COLOURS, NUM_CLASSES, PALETTE, SHAPES, class_id, parse_caption, shape_coverage, size_word,
)

__all__ = [
    "ParsedObject", "SceneParse", "parse_scene", "parse_scene_details", "semantic_map", "is_clean",
    "box_iou", "class_acc", "caption_acc", "caption_request", "mention_matches", "mentions_hold", "layout_scores",
    "semantic_scores", "object_f1", "inpaint_object_f1",
    "valid_scene_rate", "valid_scene_faults", "scene_faults", "MIN_AREA", "MAX_JUNK", "MAX_MISFIT",
    "MIN_SHAPE_MARGIN", "MAX_COLOUR_ERROR", "SIZE_BANDS", "MIN_GAP", "MAX_SPECKS", "JUNK_DISTANCE",
]

#: Max RGB distance from a palette colour for a pixel to take that colour.
COLOUR_TOLERANCE = 90.0
#: Min coverage mass of an object, as a fraction of the image area (10.2 px at 32x32; the smallest
#: object, a small triangle, covers 20.5 px).
MIN_AREA = 0.01
# ---- validity (scene_faults, valid_scene_rate). Every threshold below was measured on the world: 4,000
# eval scenes of seed 0 (indices 10,000-13,999, disjoint from the suites' conditions) in four *pass*
# families, each image parsed with this module: clean renders, Gaussian blur sigma 0.5 px, pixel noise
# sigma 3 grey levels, and a JPEG round trip at quality 95 (4:4:4). Each threshold is the loosest of the
# four families' 99.9th (upper limits) or 0.1th (lower limits) percentiles over objects (or images, for
# JUNK_DISTANCE), rounded outwards; held out (eval scenes 0-999 of seeds 0 and 1) every family scores
# >= 0.99. Measured values and the probes that must fail: docs/evaluation.md and tests/test_valid_scene.py.
#: A valid scene has at most this fraction of unexplained pixels (10 px at 32x32; pass families: 0.1 %).
MAX_JUNK = 0.01
#: A pixel outside every object's region is unexplained if its 3x3-averaged residual from the background
#: plane exceeds this (RGB distance). 99.9th percentile of the largest such residual per image: clean 5.0,
#: blur 6.7, noise 7.6, JPEG 6.0. (It was 40, which let faint off-palette objects within 11-40 of the
#: background grey pass as background; pixel noise of sigma 10 now fails too: the world has none.)
JUNK_DISTANCE = 7.6
#: Max misfit (L1 misfit / mass of the object's own shape, best over a grid of sizes and blurs; 0 = a perfect
#: render) per shape. 99.9th percentile: circle 0.021 / 0.035 / 0.054 / 0.075 (clean / blur / noise / JPEG),
#: square 0.028 / 0.050 / 0.050 / 0.063, triangle 0.047 / 0.053 / 0.089 / 0.103. Teardrops, diamonds, domes
#: and ellipses misfit by 0.15-0.45.
MAX_MISFIT: dict[str, float] = {"circle": 0.076, "square": 0.064, "triangle": 0.104}
#: Max misfit (as :data:`MAX_MISFIT`) of a *recognisable* object, per shape: the accuracy metrics (class,
#: caption, layout labels, semantic maps, object F1) count an object as its (colour, shape) only when it is
#: recognisably that shape. Measured on the ceiling of any latent model: zoo:shapes-kl-f4 reconstructions
#: of 1,500 eval scenes (indices 10,000-11,499; 2,951 objects), 99.9th percentile over both sizes, rounded
#: up: circle 0.147, square 0.120, triangle 0.194 (small objects; large ones stay under 0.085). Probes
#: that must fail (tests/test_metrics.py, 300 each): domes 0.39+, ellipses 0.35+, diamonds 0.156+ (as
#: circles), teardrops 0.19+ (as triangles; a small teardrop can be within the small-triangle bound), two
#: same-colour objects merged into one blob (94 % rejected). A square with corners rounded to 0.45 of its
#: half side misfits as a square by 0.05: recognisable (the validity rule calls it ambiguous).
#: Scripts: python scripts/calibrate_recognisable.py.
MAX_RECOGNISABLE_MISFIT: dict[str, float] = {"circle": 0.15, "square": 0.125, "triangle": 0.2}
#: :func:`semantic_map`'s label for an unrecognisable object's pixels.
UNRECOGNISED = NUM_CLASSES + 1
#: Min margin of the best shape: the other shapes' best misfit minus its own. 0.1th percentile: 0.148 / 0.124
#: / 0.133 / 0.117. A square with corners rounded to 0.45 of its half side: 0.07-0.09.
MIN_SHAPE_MARGIN = 0.116
#: Max RGB distance between an object's fitted colour (least squares: pixel = background + alpha * (colour -
#: background)) and its palette colour. 99.9th percentile: 0.23 / 0.69 / 2.45 / 2.94. Orange is 79 from
#: yellow, the midpoint of two palette colours >= 62 from both.
MAX_COLOUR_ERROR = 3.0
#: Half-extent (fraction of the image side) of a valid object: the world's SIZES widened by the 0.1th and
#: 99.9th percentiles of the parser's half-extent error (estimate - truth): small -0.0012 / +0.0038,
#: large -0.0015 / +0.0020 (at 32x32, 0.12 px at most).
SIZE_BANDS: dict[str, tuple[float, float]] = {"small": (0.098, 0.134), "large": (0.178, 0.222)}
#: Min gap between two objects' boxes (fraction of the image side): the world's 0.07 plus the 0.1th
#: percentile of the parser's gap error, -0.0085 (1.95 px at 32x32). Merged and touching objects are closer.
MIN_GAP = 0.061
#: Max specks (coloured components too small to be an object) in a valid scene. 0 in 15,999 of the 16,000
#: pass images (one JPEG image has 1); a dot of 3 px is a speck.
MAX_SPECKS = 0
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}  # centroid - box centre, in r
_PALETTE = np.array([PALETTE[c] for c in COLOURS], np.float64)
_EIGHT = np.ones((3, 3), bool)
_FIT_SIGMAS = np.round(np.arange(0.0, 1.51, 0.1), 2)  # blur grid of _shape_misfits (px)
_FIT_SCALES = np.exp(np.linspace(-0.08, 0.08, 9))  # half-extent grid, around the mass estimate
_FIT_MAX_SIDE = 48  # larger windows are fitted on block means (bounded time and memory at any image size)


@dataclass(frozen=True)
class ParsedObject:
    """One object found in an image.

    ``box`` is (x0, y0, x1, y1) normalized to 0..1; ``mask`` is ``H x W`` bool; ``area`` is the coverage
    mass in pixels; ``confidence`` in [0, 1] is how well the best shape model explains the coverage (one-shot
    fit). For validity (:func:`scene_faults`): ``misfit`` is the L1 misfit / mass of ``shape`` refitted over
    sizes and blurs (0 for a perfect render), ``shape_margin`` the other shapes' refitted misfit minus it,
    ``colour_error`` the RGB distance of the fitted colour from ``colour``'s palette value, ``extent`` the
    half-extent as a fraction of the image height.
    """

    colour: str
    shape: str
    size: str
    box: tuple[float, float, float, float]
    mask: np.ndarray
    area: float
    confidence: float
    misfit: float = 0.0
    shape_margin: float = 1.0
    colour_error: float = 0.0
    extent: float = 0.0

    @property
    def recognisable(self) -> bool:
        """Close enough to a world render of ``shape`` to be counted as it (:data:`MAX_RECOGNISABLE_MISFIT`)."""
        return self.misfit <= MAX_RECOGNISABLE_MISFIT[self.shape]

    @property
    def class_id(self) -> int:
        return class_id(self.shape, self.colour)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class SceneParse:
    """Everything :func:`parse_scene_details` found: objects, background estimate, unexplained pixels."""

    objects: tuple[ParsedObject, ...]  # largest first
    background: np.ndarray  # H x W x 3 float64
    junk: np.ndarray  # H x W bool: far from the background and not part of any object
    specks: int  # components dropped as smaller than MIN_AREA

    @property
    def junk_fraction(self) -> float:
        return float(self.junk.mean())


def _check_image(image: Any, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an H x W x 3 uint8 array, got dtype {image.dtype} shape {image.shape}")
    return image


def _fit_background(x: np.ndarray, far: np.ndarray) -> np.ndarray:
    """Least-squares plane per channel through the background candidates ``far``, refitted without outliers."""
    h, w, _ = x.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), (xx.ravel() + 0.5) / w - 0.5, (yy.ravel() + 0.5) / h - 0.5], 1)
    pixels = x.reshape(-1, 3)
    use = far.ravel()
    if use.sum() < 0.05 * h * w:  # no usable background: fall back to the image median
        return np.broadcast_to(np.median(pixels, 0), x.shape).copy()
    plane = None
    for _ in range(2):
        plane = np.linalg.lstsq(design[use], pixels[use], rcond=None)[0]
        resid = np.linalg.norm(pixels - design @ plane, axis=1)
        keep = use & (resid < 25.0)
        if keep.sum() < 0.05 * h * w:
            break
        use = keep
    return (design @ plane).reshape(h, w, 3)


def _fit_shape(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[str, float, float, float, float]:
    """Best (shape, cx, cy, r, misfit/mass) for an observed coverage window with pixel centres ``xs``, ``ys``.

    Each shape's size comes from the mass and its centre from the centroid; blur is modelled too: the
    observed spread (second moment) beyond the sharp model's is attributed to a Gaussian blur of
    variance ``sigma**2``, applied to the model before comparing.
    """
    mass = alpha.sum()
    mx, my = (alpha * xs).sum() / mass, (alpha * ys).sum() / mass
    spread = (alpha * ((xs - mx) ** 2 + (ys - my) ** 2)).sum() / mass
    best = ("circle", mx, my, 0.0, np.inf)
    for shape in SHAPES:
        r = float(np.sqrt(mass / AREA_FACTOR[shape]))
        cy = my - _CENTROID_DY[shape] * r
        model = shape_coverage(shape, mx, cy, r, xs, ys)
        m = model.sum()
        model_spread = (model * ((xs - mx) ** 2 + (ys - (model * ys).sum() / m) ** 2)).sum() / m
        sigma2 = (spread - model_spread) / 2
        if sigma2 > 0.04:
            model = ndimage.gaussian_filter(model, np.sqrt(sigma2), mode="constant")
        err = np.abs(model - alpha).sum() / mass
        if err < best[4]:
            best = (shape, mx, cy, r, err)
    return best


@lru_cache(maxsize=256)
def _blur_matrices(n: int) -> np.ndarray:
    """``len(_FIT_SIGMAS) x n x n``: ``B[k] @ m @ B'[k]`` is ``gaussian_filter(m, _FIT_SIGMAS[k], mode="constant")``."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    out = np.empty((len(_FIT_SIGMAS), n, n))
    for k, s in enumerate(_FIT_SIGMAS):
        if s == 0:
            out[k] = np.eye(n)
            continue
        radius = int(4.0 * s + 0.5)  # scipy's kernel: truncated at 4 sigma, normalized over its taps
        norm = np.exp(-0.5 * np.arange(-radius, radius + 1) ** 2 / s**2).sum()
        out[k] = np.where(np.abs(d) <= radius, np.exp(-0.5 * d**2 / s**2), 0.0) / norm
    out.flags.writeable = False
    return out


def _shape_misfits(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> dict[str, float]:
    """Each shape's best L1 misfit / mass to an observed coverage window, over a grid of sizes and blurs.

    The centre comes from the centroid (blur keeps it); the half-extent ranges over ``_FIT_SCALES`` times
    the one the mass implies and the Gaussian blur over ``_FIT_SIGMAS`` (the grid search of
    :func:`_fit_shape`'s one-shot estimate), so a world render, blurred or not, is fitted to within its
    rendering and quantization error and only a shape the world does not draw is left with a large misfit.
    Windows wider than ``_FIT_MAX_SIDE`` pixels are fitted on their block means (the world at 32x32 and
    64x64 never needs it).
    """
    f = -(-max(alpha.shape) // _FIT_MAX_SIDE)
    if f > 1:  # a big window (large images): fit its f x f block means, in block units (coverage adds up)
        h, w = alpha.shape
        ph, pw = -h % f, -w % f
        alpha = np.pad(alpha, ((0, ph), (0, pw))).reshape((h + ph) // f, f, (w + pw) // f, f).mean((1, 3))
        ys = (ys[0, 0] - 0.5 + (np.arange(alpha.shape[0])[:, None] + 0.5) * f) / f
        xs = (xs[0, 0] - 0.5 + (np.arange(alpha.shape[1])[None, :] + 0.5) * f) / f
    mass = float(alpha.sum())
    mx, my = (alpha * xs).sum() / mass, (alpha * ys).sum() / mass
    h, w = alpha.shape
    by, bx = _blur_matrices(h), _blur_matrices(w)
    # a candidate may reach beyond the window (a circle fitted to a large square, a triangle to a circle):
    # the model is drawn on the window grown by its size on every side, and its mass outside the window,
    # where alpha is 0, counts in full (blur moves mass but keeps it, so outside = total - inside)
    pad = max(h, w)
    ys_p = ys[0, 0] + np.arange(-pad, h + pad, dtype=np.float64)[:, None]
    xs_p = xs[0, 0] + np.arange(-pad, w + pad, dtype=np.float64)[None, :]
    out = {}
    for shape in SHAPES:
        r = np.sqrt(mass / AREA_FACTOR[shape]) * _FIT_SCALES[:, None, None]
        model = shape_coverage(shape, mx, my - _CENTROID_DY[shape] * r, r, xs_p, ys_p)  # scales x h' x w'
        total = model.sum((-2, -1))[:, None]
        blurred = by[None] @ model[:, None, pad:pad + h, pad:pad + w] @ bx[None]  # scales x sigmas x h x w
        err = np.abs(blurred - alpha).sum((-2, -1)) + np.maximum(total - blurred.sum((-2, -1)), 0.0)
        out[shape] = float(err.min() / mass)
    return out


def parse_scene_details(image: np.ndarray) -> SceneParse:
    """Parse an ``H x W x 3`` uint8 image into objects, plus the background and unexplained pixels.

    Results are cached by image content (the last 4,096 images), so suites that score the same images
    several ways parse each once; the returned arrays are read-only.
    """
    image = _check_image(image)
    return _parse_cached(image.tobytes(), image.shape)


@lru_cache(maxsize=4096)
def _parse_cached(data: bytes, shape: tuple[int, int, int]) -> SceneParse:
    h, w, _ = shape
    x = np.frombuffer(data, np.uint8).reshape(shape).astype(np.float64)
    dist = np.linalg.norm(x[:, :, None, :] - _PALETTE, axis=-1)  # H x W x colours
    bg = _fit_background(x, dist.min(-1) > 60.0)
    bg_dist = np.linalg.norm(x - bg, axis=-1)
    nearest = dist.argmin(-1)
    near_dist = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]
    coloured = (near_dist < bg_dist) & (near_dist < COLOUR_TOLERANCE)
    # junk is judged on the 3x3-smoothed residual, so pixel noise is not junk but a 2x2 blot is
    explained = np.linalg.norm(ndimage.uniform_filter(x - bg, size=(3, 3, 1)), axis=-1) <= JUNK_DISTANCE
    pix_y, pix_x = np.arange(h, dtype=np.float64)[:, None] + 0.5, np.arange(w, dtype=np.float64)[None, :] + 0.5
    objects, specks = [], 0
    for k in np.unique(nearest[coloured]):
        comps, count = ndimage.label(coloured & (nearest == k), structure=_EIGHT)
        toward = _PALETTE[k] - bg  # H x W x 3, background -> colour
        alpha_k = np.clip((np.einsum("hwc,hwc->hw", x - bg, toward)
                           / np.maximum(np.einsum("hwc,hwc->hw", toward, toward), 1e-6)), 0.0, 1.0)
        sizes = np.bincount(comps.ravel(), minlength=count + 1)
        for sl, label in zip(ndimage.find_objects(comps), range(1, count + 1)):
            if sizes[label] < 0.4 * MIN_AREA * h * w:  # far too few pixels to reach MIN_AREA: a speck
                specks += 1
                continue
            y0, y1 = max(sl[0].start - 3, 0), min(sl[0].stop + 3, h)
            x0, x1 = max(sl[1].start - 3, 0), min(sl[1].stop + 3, w)
            comp = comps[y0:y1, x0:x1] == label
            region = ndimage.binary_dilation(comp, _EIGHT, iterations=2) & ~(coloured[y0:y1, x0:x1] & ~comp)
            alpha = np.where(region, alpha_k[y0:y1, x0:x1], 0.0)
            mass = float(alpha.sum())
            if mass < MIN_AREA * h * w:
                specks += 1
                continue
            shape, cx, cy, r, misfit = _fit_shape(alpha, pix_y[y0:y1], pix_x[:, x0:x1])
            fits = _shape_misfits(alpha, pix_y[y0:y1], pix_x[:, x0:x1])
            # the object's colour, fitted by least squares to x = bg + alpha * (colour - bg) over the region
            # (blur-invariant: blurring mixes colour and background with the same weights as alpha)
            a = alpha[..., None]
            fitted = ((a * (x[y0:y1, x0:x1] - bg[y0:y1, x0:x1]) + a * a * bg[y0:y1, x0:x1]).sum((0, 1))
                      / max(float((alpha * alpha).sum()), 1e-9))
            mask = np.zeros((h, w), bool)
            mask[y0:y1, x0:x1] = comp & (alpha >= 0.5)
            mask.flags.writeable = False
            explained[y0:y1, x0:x1] |= region
            box = (max((cx - r) / w, 0.0), max((cy - r) / h, 0.0), min((cx + r) / w, 1.0), min((cy + r) / h, 1.0))
            objects.append(ParsedObject(
                colour=COLOURS[k], shape=shape, size=size_word(2 * r / h), box=box, mask=mask, area=mass,
                confidence=float(np.clip(1.0 - misfit, 0.0, 1.0)),
                misfit=fits[shape], shape_margin=min(v for k2, v in fits.items() if k2 != shape) - fits[shape],
                colour_error=float(np.linalg.norm(fitted - _PALETTE[k])),
                extent=float(r / h),
            ))
    objects.sort(key=lambda o: -o.area)
    junk = ~explained
    bg.flags.writeable = junk.flags.writeable = False
    return SceneParse(objects=tuple(objects), background=bg, junk=junk, specks=specks)


def parse_scene(image: np.ndarray) -> list[ParsedObject]:
    """The objects in an ``H x W x 3`` uint8 image, largest first (see the module docstring)."""
    return list(parse_scene_details(image).objects)


def scene_faults(parse: SceneParse) -> tuple[str, ...]:
    """Why a parsed scene is not one the shapes world could have drawn; ``()`` for a valid scene.

    The rules (thresholds measured on the world, see :data:`MAX_MISFIT` and the module docstring):

    - ``"count"``: not 1-4 objects;
    - ``"junk"``: more than :data:`MAX_JUNK` of the pixels unexplained (off-palette blots, noise);
    - ``"speck"``: more than :data:`MAX_SPECKS` coloured components too small to be an object;
    - ``"shape"``: an object's own shape misfits it by more than :data:`MAX_MISFIT` (not close to a render);
    - ``"ambiguous"``: another shape fits within :data:`MIN_SHAPE_MARGIN` of the object's (not recognisable);
    - ``"colour"``: the object's fitted colour is farther than :data:`MAX_COLOUR_ERROR` from its palette colour;
    - ``"size"``: the object's half-extent is outside both :data:`SIZE_BANDS`;
    - ``"touching"``: two objects' boxes closer than :data:`MIN_GAP` (merged or touching objects).
    """
    faults = []
    objs = parse.objects
    h, w = parse.junk.shape
    if not 1 <= len(objs) <= 4:
        faults.append("count")
    if parse.junk_fraction > MAX_JUNK:
        faults.append("junk")
    if parse.specks > MAX_SPECKS:
        faults.append("speck")
    if any(o.misfit > MAX_MISFIT[o.shape] for o in objs):
        faults.append("shape")
    if any(o.shape_margin < MIN_SHAPE_MARGIN for o in objs):
        faults.append("ambiguous")
    if any(o.colour_error > MAX_COLOUR_ERROR for o in objs):
        faults.append("colour")
    if any(not any(lo <= o.extent <= hi for lo, hi in SIZE_BANDS.values()) for o in objs):
        faults.append("size")
    for i, a in enumerate(objs):
        if any(_box_gap(a.box, b.box, h, w) < MIN_GAP * h for b in objs[:i]):
            faults.append("touching")
            break
    return tuple(faults)


def _box_gap(a: tuple[float, ...], b: tuple[float, ...], h: int, w: int) -> float:
    """Pixels between two normalized boxes along the axis where they are farthest apart (< 0: they overlap)."""
    return max((b[0] - a[2]) * w, (a[0] - b[2]) * w, (b[1] - a[3]) * h, (a[1] - b[3]) * h)


def is_clean(parse: SceneParse) -> bool:
    """A valid scene, one the shapes world could have drawn: no :func:`scene_faults`."""
    return not scene_faults(parse)


def semantic_map(objects: Sequence[ParsedObject], shape: tuple[int, int]) -> np.ndarray:
    """An ``H x W`` int64 map: 0 background, ``class_id + 1`` on each recognisable object's mask and
    :data:`UNRECOGNISED` on an unrecognisable one's (a label no asked map holds)."""
    seg = np.zeros(shape, np.int64)
    for o in objects:
        seg[o.mask] = o.class_id + 1 if o.recognisable else UNRECOGNISED
    return seg


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N x 4) and ``b`` (M x 4) given as (x0, y0, x1, y1): an N x M array."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


# ----------------------------------------------------------------------------- metrics


def _check_pairs(conditions: Sequence[Sample], images: Sequence[np.ndarray]) -> None:
    if len(conditions) != len(images):
        raise ValueError(f"got {len(conditions)} conditions but {len(images)} images; they must pair up")
    if not conditions:
        raise ValueError("conditions must not be empty")


def _truth(sample: Sample) -> list[dict[str, Any]]:
    """The asked objects: ``meta["objects"]`` if present, else the boxes (with shapes/colours from labels)."""
    if "objects" in sample.meta:
        return sample.meta["objects"]
    if sample.boxes is None:
        raise ValueError("a condition needs meta['objects'] or boxes to be scored against")
    out = []
    for b in sample.boxes:
        colour, shape = b.label.split()
        out.append({"shape": shape, "colour": colour, "class_id": class_id(shape, colour), "box": list(b.bbox)})
    return out


def class_acc(conditions: Sequence[Sample], images: Sequence[np.ndarray]) -> float:
    """Fraction of images whose largest parsed object is recognisable (:attr:`ParsedObject.recognisable`)
    and has the asked class (``Sample.label``)."""
    _check_pairs(conditions, images)
    hits = 0
    for s, img in zip(conditions, images):
        objs = parse_scene(img)
        hits += bool(objs) and objs[0].recognisable and objs[0].class_id == s.label
    return hits / len(conditions)


def mention_matches(m: dict[str, Any], objs: list[ParsedObject], sized: bool = True) -> list[ParsedObject]:
    """The parsed objects that realize one caption mention: recognisable, of its colour and shape (and
    size, if it names one and ``sized``)."""
    return [o for o in objs if o.recognisable and o.colour == m["colour"] and o.shape == m["shape"]
            and (not sized or m.get("size") is None or o.size == m["size"])]


def mentions_hold(want: list[dict[str, Any]], relation: str | None, objs: list[ParsedObject]) -> bool:
    """True if parsed objects realize every mention (colour, shape, size if given) and the relation.

    Relations are checked on box centres ("left of": centre x smaller, "above": centre y smaller).
    """
    def matches(m: dict[str, Any]) -> list[ParsedObject]:
        return mention_matches(m, objs)

    first = matches(want[0])
    if len(want) == 1:
        return bool(first)
    second = matches(want[1])
    for a in first:
        for b in second:
            if a is b:
                continue
            (ax, ay), (bx, by) = a.centre, b.centre
            if {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]:
                return True
    return False


def caption_request(sample: Sample) -> tuple[list[dict[str, Any]], str | None]:
    """What a caption asks for: from ``meta["caption"]`` (structured) or by parsing the text."""
    cap = sample.meta.get("caption")
    if isinstance(cap, dict) and "objects" in sample.meta:
        objs = sample.meta["objects"]
        want = [{"shape": objs[i]["shape"], "colour": objs[i]["colour"],
                 "size": objs[i]["size"] if named else None} for i, named in zip(cap["objects"], cap["sizes"])]
        return want, cap["relation"]
    if sample.caption is None:
        raise ValueError("a condition needs a caption (or meta['caption']) for caption_acc")
    parsed = parse_caption(sample.caption)
    return parsed["objects"], parsed["relation"]


def caption_acc(conditions: Sequence[Sample], images: Sequence[np.ndarray]) -> float:
    """Fraction of images in which every object the caption mentions is present with the right colour,
    shape (and size, when the caption names it) and, for two mentions, the relation holds between them."""
    _check_pairs(conditions, images)
    hits = 0
    for s, img in zip(conditions, images):
        want, relation = caption_request(s)
        hits += mentions_hold(want, relation, parse_scene(img))
    return hits / len(conditions)


def _same_class(truth: dict[str, Any], obj: ParsedObject) -> bool:
    """An asked object and a parsed one agree: the parsed one is recognisable and of the asked class."""
    return obj.recognisable and truth["class_id"] == obj.class_id


def _match(truth: list[dict[str, Any]], objs: list[ParsedObject]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of asked and parsed boxes by IoU; returns (asked idx, parsed idx, IoU), IoU > 0 only."""
    if not truth or not objs:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    iou = box_iou(np.array([t["box"] for t in truth]), np.array([o.box for o in objs]))
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0
    return rows[keep], cols[keep], iou[rows, cols][keep]


def layout_scores(conditions: Sequence[Sample], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Box fidelity: ``miou``, ``count_acc``, ``label_acc``.

    - ``miou``: per image, asked and parsed boxes are matched one-to-one (Hungarian, maximal total IoU;
      pairs with IoU 0 stay unmatched); the image scores ``sum(matched IoU) / (matched + unmatched asked
      + unmatched parsed)``; averaged over images;
    - ``count_acc``: fraction of images with as many parsed objects as asked boxes;
    - ``label_acc``: among matched pairs with IoU >= 0.5 (pooled over images), the fraction whose parsed
      object is recognisable and of the asked (colour, shape); 0.0 if there is no such pair.

    An unrecognisable object still has its box: it counts in ``miou`` and ``count_acc`` as any other.
    """
    _check_pairs(conditions, images)
    mious, counts, label_hits, label_total = [], 0, 0, 0
    for s, img in zip(conditions, images):
        truth, objs = _truth(s), parse_scene(img)
        rows, cols, iou = _match(truth, objs)
        union = len(truth) + len(objs) - len(rows)
        mious.append(iou.sum() / union if union else 1.0)
        counts += len(truth) == len(objs)
        good = iou >= 0.5
        label_total += int(good.sum())
        label_hits += sum(_same_class(truth[r], objs[c]) for r, c in zip(rows[good], cols[good]))
    return {"miou": float(np.mean(mious)), "count_acc": counts / len(conditions),
            "label_acc": label_hits / label_total if label_total else 0.0}


def semantic_scores(conditions: Sequence[Sample], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Semantic-map fidelity of the parser's map (:func:`semantic_map`) against ``Sample.segmentation``.

    - ``pixel_acc``: fraction of all pixels (background included) with the asked class;
    - ``miou``: per-class IoU from the confusion matrix pooled over all images, averaged over the classes
      (background included) that occur in the asked or the parsed maps. Pixels of an unrecognisable
      object are wrong for whatever was asked there (they lower that class's IoU and ``pixel_acc``);
      :data:`UNRECOGNISED` is not itself a class in the mean.
    """
    _check_pairs(conditions, images)
    labels = UNRECOGNISED + 1
    confusion = np.zeros((labels, labels), np.int64)
    for s, img in zip(conditions, images):
        img = _check_image(img)
        if s.segmentation is None or s.segmentation.shape != img.shape[:2]:
            raise ValueError(f"condition segmentation must be {img.shape[:2]}, got "
                             f"{None if s.segmentation is None else s.segmentation.shape}")
        pred = semantic_map(parse_scene(img), img.shape[:2])
        confusion += np.bincount(s.segmentation.ravel() * labels + pred.ravel(),
                                 minlength=labels**2).reshape(labels, labels)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    present[UNRECOGNISED] = False
    return {"pixel_acc": float(tp.sum() / confusion.sum()), "miou": float((tp[present] / union[present]).mean())}


def object_f1(conditions: Sequence[Sample], images: Sequence[np.ndarray], iou_threshold: float = 0.5) -> float:
    """F1 of parsed vs. asked objects, pooled over images; a true positive is a Hungarian-matched pair with
    IoU >= ``iou_threshold`` whose parsed object is recognisable and of the asked (colour, shape)."""
    _check_pairs(conditions, images)
    tp = n_true = n_found = 0
    for s, img in zip(conditions, images):
        truth, objs = _truth(s), parse_scene(img)
        rows, cols, iou = _match(truth, objs)
        tp += sum(_same_class(truth[r], objs[c]) for r, c, v in zip(rows, cols, iou) if v >= iou_threshold)
        n_true, n_found = n_true + len(truth), n_found + len(objs)
    return 2 * tp / (n_true + n_found) if n_true + n_found else 1.0


def _visible_fractions(sample: Sample, hole: np.ndarray) -> list[float]:
    """Per truth object, the fraction of its pixels (the class map inside its box) outside ``hole``."""
    if sample.segmentation is None:
        raise ValueError("inpainting scores need the condition's segmentation (the objects' pixels)")
    h, w = hole.shape
    out = []
    for o in _truth(sample):
        x0, y0, x1, y1 = o["box"]
        rows = slice(int(np.floor(y0 * h)), int(np.ceil(y1 * h)))
        cols = slice(int(np.floor(x0 * w)), int(np.ceil(x1 * w)))
        pix = sample.segmentation[rows, cols] == o["class_id"] + 1
        total = int(pix.sum())
        out.append(float((pix & ~hole[rows, cols]).sum() / total) if total else 0.0)
    return out


def inpaint_object_f1(conditions: Sequence[Sample], images: Sequence[np.ndarray], min_visible: float = 0.5,
                      iou_threshold: float = 0.5) -> float:
    """Object F1 for inpainting: only what the visible part of the scene determines counts.

    Asked (truth) objects with at least ``min_visible`` of their pixels outside the hole (``mask``, True =
    unknown) must be found — same (colour, shape), IoU >= ``iou_threshold`` after Hungarian matching. An
    object mostly hidden cannot be known from the input: a parsed object matched to it, or one lying
    mostly inside the hole and matched to nothing, is plausible content, neither a hit nor an error. Every
    other parsed object (a spurious object in the known region) is a false positive. Pooled over images.
    """
    _check_pairs(conditions, images)
    tp = n_required = n_false = 0
    for s, img in zip(conditions, images):
        if s.mask is None:
            raise ValueError("inpainting scores need the condition's mask (True = the hole)")
        hole = np.asarray(s.mask, bool)
        truth, objs = _truth(s), parse_scene(img)
        required = [v >= min_visible for v in _visible_fractions(s, hole)]
        rows, cols, iou = _match(truth, objs)
        matched = dict(zip(cols.tolist(), zip(rows.tolist(), iou.tolist())))
        n_required += sum(required)
        for j, o in enumerate(objs):
            if j in matched:
                r, v = matched[j]
                hit = v >= iou_threshold and _same_class(truth[r], o)
                if required[r]:
                    tp += hit
                    n_false += not hit  # a required object drawn wrong is both missed and spurious
                continue
            inside = float((o.mask & hole).sum() / max(int(o.mask.sum()), 1))
            n_false += inside < 0.5
    return 2 * tp / (2 * tp + (n_required - tp) + n_false) if n_required + n_false else 1.0


def valid_scene_rate(images: Sequence[np.ndarray]) -> float:
    """Fraction of images that parse into a valid scene, one the shapes world could have drawn (:func:`is_clean`)."""
    if not len(images):
        raise ValueError("images must not be empty")
    return sum(is_clean(parse_scene_details(img)) for img in images) / len(images)


def valid_scene_faults(images: Sequence[np.ndarray]) -> dict[str, float]:
    """For each rule of :func:`scene_faults`, the fraction of images that break it (an image can break several);
    ``"valid"`` is :func:`valid_scene_rate`. Tells what a generator gets wrong."""
    if not len(images):
        raise ValueError("images must not be empty")
    counts = dict.fromkeys(("valid", "count", "junk", "speck", "shape", "ambiguous", "colour", "size", "touching"), 0)
    for img in images:
        faults = scene_faults(parse_scene_details(img))
        counts["valid"] += not faults
        for f in faults:
            counts[f] += 1
    return {k: v / len(images) for k, v in counts.items()}
