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
   pixels with ``alpha >= 1/2``.

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
    "box_iou", "class_acc", "caption_acc", "layout_scores", "semantic_scores", "object_f1",
    "valid_scene_rate", "MIN_AREA", "MIN_CONFIDENCE", "MAX_JUNK",
]

#: Max RGB distance from a palette colour for a pixel to take that colour.
COLOUR_TOLERANCE = 90.0
#: Min coverage mass of an object, as a fraction of the image area (10.2 px at 32x32; the smallest
#: object, a small triangle, covers 20.5 px).
MIN_AREA = 0.01
#: A clean object's shape model explains its coverage at least this well (``1 - misfit / mass``).
MIN_CONFIDENCE = 0.6
#: A clean scene has at most this fraction of unexplained pixels (10 px at 32x32).
MAX_JUNK = 0.01
_JUNK_DISTANCE = 40.0  # a pixel this far from the background estimate must belong to an object
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}  # centroid - box centre, in r
_PALETTE = np.array([PALETTE[c] for c in COLOURS], np.float64)
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class ParsedObject:
    """One object found in an image.

    ``box`` is (x0, y0, x1, y1) normalized to 0..1; ``mask`` is ``H x W`` bool; ``area`` is the coverage
    mass in pixels; ``confidence`` in [0, 1] is how well the best shape model explains the coverage.
    """

    colour: str
    shape: str
    size: str
    box: tuple[float, float, float, float]
    mask: np.ndarray
    area: float
    confidence: float

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
    explained = np.linalg.norm(ndimage.uniform_filter(x - bg, size=(3, 3, 1)), axis=-1) <= _JUNK_DISTANCE
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
            mask = np.zeros((h, w), bool)
            mask[y0:y1, x0:x1] = comp & (alpha >= 0.5)
            mask.flags.writeable = False
            explained[y0:y1, x0:x1] |= region
            box = (max((cx - r) / w, 0.0), max((cy - r) / h, 0.0), min((cx + r) / w, 1.0), min((cy + r) / h, 1.0))
            objects.append(ParsedObject(
                colour=COLOURS[k], shape=shape, size=size_word(2 * r / h), box=box, mask=mask, area=mass,
                confidence=float(np.clip(1.0 - misfit, 0.0, 1.0)),
            ))
    objects.sort(key=lambda o: -o.area)
    junk = ~explained
    bg.flags.writeable = junk.flags.writeable = False
    return SceneParse(objects=tuple(objects), background=bg, junk=junk, specks=specks)


def parse_scene(image: np.ndarray) -> list[ParsedObject]:
    """The objects in an ``H x W x 3`` uint8 image, largest first (see the module docstring)."""
    return list(parse_scene_details(image).objects)


def is_clean(parse: SceneParse) -> bool:
    """A clean scene: 1-4 objects, each with ``confidence >= MIN_CONFIDENCE``, and at most ``MAX_JUNK`` of
    the pixels unexplained: neither within two pixels of an object nor, after a 3x3 box average of the
    residual image minus background, within RGB distance 40 of the background plane (specks and
    off-palette blots count as unexplained, isolated noisy pixels do not)."""
    return (1 <= len(parse.objects) <= 4 and all(o.confidence >= MIN_CONFIDENCE for o in parse.objects)
            and parse.junk_fraction <= MAX_JUNK)


def semantic_map(objects: Sequence[ParsedObject], shape: tuple[int, int]) -> np.ndarray:
    """An ``H x W`` int64 map: 0 background, ``class_id + 1`` on each object's mask."""
    seg = np.zeros(shape, np.int64)
    for o in objects:
        seg[o.mask] = o.class_id + 1
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
    """Fraction of images whose largest parsed object has the asked class (``Sample.label``)."""
    _check_pairs(conditions, images)
    hits = 0
    for s, img in zip(conditions, images):
        objs = parse_scene(img)
        hits += bool(objs) and objs[0].class_id == s.label
    return hits / len(conditions)


def _mentions_hold(want: list[dict[str, Any]], relation: str | None, objs: list[ParsedObject]) -> bool:
    """True if parsed objects realize every mention (colour, shape, size if given) and the relation.

    Relations are checked on box centres ("left of": centre x smaller, "above": centre y smaller).
    """
    def matches(m: dict[str, Any]) -> list[ParsedObject]:
        return [o for o in objs if o.colour == m["colour"] and o.shape == m["shape"]
                and (m.get("size") is None or o.size == m["size"])]

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


def _caption_request(sample: Sample) -> tuple[list[dict[str, Any]], str | None]:
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
        want, relation = _caption_request(s)
        hits += _mentions_hold(want, relation, parse_scene(img))
    return hits / len(conditions)


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
      (colour, shape) equals the asked one; 0.0 if there is no such pair.
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
        label_hits += sum(truth[r]["class_id"] == objs[c].class_id for r, c in zip(rows[good], cols[good]))
    return {"miou": float(np.mean(mious)), "count_acc": counts / len(conditions),
            "label_acc": label_hits / label_total if label_total else 0.0}


def semantic_scores(conditions: Sequence[Sample], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Semantic-map fidelity of the parser's map (:func:`semantic_map`) against ``Sample.segmentation``.

    - ``pixel_acc``: fraction of all pixels (background included) with the asked class;
    - ``miou``: per-class IoU from the confusion matrix pooled over all images, averaged over the classes
      (background included) that occur in the asked or the parsed maps.
    """
    _check_pairs(conditions, images)
    confusion = np.zeros((NUM_CLASSES + 1, NUM_CLASSES + 1), np.int64)
    for s, img in zip(conditions, images):
        img = _check_image(img)
        if s.segmentation is None or s.segmentation.shape != img.shape[:2]:
            raise ValueError(f"condition segmentation must be {img.shape[:2]}, got "
                             f"{None if s.segmentation is None else s.segmentation.shape}")
        pred = semantic_map(parse_scene(img), img.shape[:2])
        confusion += np.bincount(s.segmentation.ravel() * (NUM_CLASSES + 1) + pred.ravel(),
                                 minlength=(NUM_CLASSES + 1) ** 2).reshape(NUM_CLASSES + 1, -1)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    return {"pixel_acc": float(tp.sum() / confusion.sum()), "miou": float((tp[present] / union[present]).mean())}


def object_f1(conditions: Sequence[Sample], images: Sequence[np.ndarray], iou_threshold: float = 0.5) -> float:
    """F1 of parsed vs. asked objects, pooled over images; a true positive is a Hungarian-matched pair with
    IoU >= ``iou_threshold`` and the same (colour, shape)."""
    _check_pairs(conditions, images)
    tp = n_true = n_found = 0
    for s, img in zip(conditions, images):
        truth, objs = _truth(s), parse_scene(img)
        rows, cols, iou = _match(truth, objs)
        tp += sum(truth[r]["class_id"] == objs[c].class_id for r, c, v in zip(rows, cols, iou) if v >= iou_threshold)
        n_true, n_found = n_true + len(truth), n_found + len(objs)
    return 2 * tp / (n_true + n_found) if n_true + n_found else 1.0


def valid_scene_rate(images: Sequence[np.ndarray]) -> float:
    """Fraction of images that parse into a clean scene (:func:`is_clean`)."""
    if not len(images):
        raise ValueError("images must not be empty")
    return sum(is_clean(parse_scene_details(img)) for img in images) / len(images)
