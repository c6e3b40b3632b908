"""The shapes world: synthetic scenes of coloured shapes with every modality's ground truth.

A scene holds 1-4 non-overlapping objects on a softly shaded grey background. Each object is one of
:data:`SHAPES` in one of :data:`COLOURS`, ``small`` or ``large`` (see :data:`SIZES`), drawn with
analytic anti-aliasing (pixel coverage ``clip(0.5 - sdf, 0, 1)`` of a signed distance in pixels).
Because the scene is known exactly, a generated image can be parsed back into objects
(:mod:`ldmkit.metrics.shapes`) and every conditioner's fidelity measured.

Every :class:`~ldmkit.data.base.Sample` carries:

- ``image``: ``S x S x 3`` uint8;
- ``label``: :func:`class_id` of the largest object (by area; scenes are drawn so that it is at least
  :data:`LARGEST_MARGIN` times larger than the runner-up). ``NUM_CLASSES = len(SHAPES) * len(COLOURS)``
  = 18, ordered shape-major: ``class_id(shape, colour) = SHAPES.index(shape) * len(COLOURS) +
  COLOURS.index(colour)`` (:func:`class_name` inverts it);
- ``caption``: from the grammar ``a [size] colour shape [relation a [size] colour shape]`` with relation
  one of :data:`RELATIONS` (e.g. "a small red circle above a blue square"); one object for one-object
  scenes, otherwise a random ordered pair of the scene's objects and a relation that holds strictly
  (the first box lies entirely on that side of the second); the size word is present with probability
  1/2 per mention. :func:`parse_caption` inverts it;
- ``boxes``: one ``Box("red circle", (x0, y0, x1, y1))`` per object, normalized to 0..1;
- ``segmentation``: ``S x S`` int64, 0 = background, ``class_id + 1`` where an object covers >= 1/2 of
  the pixel;
- ``lowres``: ``S/4 x S/4 x 3`` uint8, the image area-averaged over 4x4 blocks (:func:`area_downsample`);
- ``mask``: ``S x S`` bool, True inside one random axis-aligned rectangle covering about 25-50 % of the
  image (the region to inpaint);
- ``meta``: ``source``, ``split``, ``seed``, ``index``, ``objects`` (list of dicts with ``shape``,
  ``colour``, ``size``, ``class_id``, ``box``) and ``caption`` (``{"objects": [i] or [i, j],
  "relation": None or str, "sizes": [bool, ...]}`` indexing ``objects``; ``sizes`` tells which mentions
  name the size).

Splits (:data:`SPLITS`) use distinct seed streams: scene ``i`` of split ``s`` is drawn by a
``numpy.random.Generator(PCG64)`` seeded with ``SeedSequence([seed, SPLIT_CODE[s], i])``, so the output
is byte-identical on any machine. ``train-text`` never contains a :data:`HELDOUT` (colour, shape)
combination; every ``eval-heldout`` caption mentions one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ldmkit.data.base import Box, Sample

__all__ = [
    "SHAPES", "COLOURS", "PALETTE", "SIZES", "SIZE_THRESHOLD", "RELATIONS", "HELDOUT", "SPLITS", "NUM_CLASSES",
    "LARGEST_MARGIN", "AREA_FACTOR", "ShapesWorld", "make_scene", "render_scene", "class_id", "class_name",
    "parse_caption", "size_word", "shape_coverage", "area_downsample",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
#: RGB of each colour (pairwise distance >= 125, >= 95 from any background grey).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 40),
    "magenta": (205, 50, 200),
    "cyan": (40, 195, 210),
}
#: Size vocabulary: half-extent ``r`` (half the bounding-box side) as a fraction of the image side.
#: At 32x32 a small object spans 6.4-8.3 px, a large one 11.5-14.1 px.
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.13), "large": (0.18, 0.22)}
#: Box side (fraction of the image side) separating "small" from "large".
SIZE_THRESHOLD = 0.31
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: (colour, shape) combinations absent from every ``train-text`` scene.
HELDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"),
)
SPLITS: tuple[str, ...] = ("train", "train-text", "eval", "eval-heldout")
SPLIT_CODE: dict[str, int] = {"train": 0, "train-text": 1, "eval": 2, "eval-heldout": 3}
DEFAULT_LENGTH: dict[str, int] = {"train": 1_000_000, "train-text": 1_000_000, "eval": 100_000,
                                  "eval-heldout": 100_000}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
#: Largest image side the world renders (a 2048 x 2048 scene needs about 0.6 GiB while rendering).
MAX_SIZE = 2048
#: The largest object's area is at least this many times any other object's area.
LARGEST_MARGIN = 1.25
MAX_OBJECTS = 4
_MARGIN = 0.03  # objects keep this fraction of the image side from the border
_GAP = 0.07  # and this fraction between each other's boxes
#: Area of each shape with half-extent ``r``: ``AREA_FACTOR[shape] * r**2``.
AREA_FACTOR: dict[str, float] = {"circle": float(np.pi), "square": 4.0, "triangle": 2.0}
_SQRT5 = float(np.sqrt(5.0))
_PALETTE_F64 = {name: np.asarray(rgb, np.float64) for name, rgb in PALETTE.items()}


def class_id(shape: str, colour: str) -> int:
    """The class id of a (shape, colour) pair: ``SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)``."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {COLOURS}, got {colour!r}")
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def class_name(cid: int) -> tuple[str, str]:
    """The (shape, colour) of a class id; inverse of :func:`class_id`."""
    if not 0 <= cid < NUM_CLASSES:
        raise ValueError(f"class id must be in 0..{NUM_CLASSES - 1}, got {cid}")
    return SHAPES[cid // len(COLOURS)], COLOURS[cid % len(COLOURS)]


def size_word(side: float) -> str:
    """``"small"`` or ``"large"`` for a box side given as a fraction of the image side."""
    return "small" if side < SIZE_THRESHOLD else "large"


def shape_coverage(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape with box ``[cx-r, cx+r] x [cy-r, cy+r]`` (pixel units).

    ``xs`` (row vector) and ``ys`` (column vector) are pixel-centre coordinates (``i + 0.5``). The triangle
    points up with its base on the box's bottom edge. Squares and triangles use the max of their edges'
    signed distances, exact inside and along edges, which is all a half-pixel ramp needs.
    """
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx) - r, np.abs(dy) - r)
    elif shape == "triangle":
        sdf = np.maximum(dy - r, (2.0 * np.abs(dx) - (dy + r)) / _SQRT5)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return np.minimum(np.maximum(0.5 - sdf, 0.0), 1.0)


def area_downsample(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """Average ``factor x factor`` blocks of an ``H x W x C`` image (H, W divisible by ``factor``).

    uint8 in, uint8 out (the block mean rounded half up); float in, float64 out.
    """
    h, w = image.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by factor={factor}")
    if image.dtype != np.uint8:
        return image.reshape(h // factor, factor, w // factor, factor, -1).mean(axis=(1, 3), dtype=np.float64)
    cols = image.astype(np.uint32).reshape(h, w // factor, factor, -1)
    rows = sum(cols[:, :, k] for k in range(factor)).reshape(h // factor, factor, w // factor, -1)
    n = factor * factor
    return ((sum(rows[:, k] for k in range(factor)) + n // 2) // n).astype(np.uint8)


# ----------------------------------------------------------------------------- scene drawing


def _pick(rng: np.random.Generator, n: int) -> int:
    """A uniform integer in ``0..n-1`` (cheaper than ``rng.integers`` for one draw)."""
    return min(int(rng.random() * n), n - 1)


def _draw_objects(rng: np.random.Generator, size: int, split: str) -> list[dict[str, Any]]:
    """Draw 1-4 objects (shape, colour, size word, radius, centre) that fit without overlapping."""
    while True:  # rejection loop: about 61 % of scenes succeed on the first draw (docs/data.md: objects per scene)
        n = 1 + _pick(rng, MAX_OBJECTS)
        objs = []
        for k in range(n):
            if split == "eval-heldout" and k == 0:
                colour, shape = HELDOUT[_pick(rng, len(HELDOUT))]
            else:
                while True:
                    shape, colour = SHAPES[_pick(rng, len(SHAPES))], COLOURS[_pick(rng, len(COLOURS))]
                    if split != "train-text" or (colour, shape) not in HELDOUT:
                        break
            word = "small" if rng.random() < 0.5 else "large"
            lo, hi = SIZES[word]
            objs.append({"shape": shape, "colour": colour, "size": word, "r": size * (lo + (hi - lo) * rng.random())})
        areas = sorted((AREA_FACTOR[o["shape"]] * o["r"] ** 2 for o in objs), reverse=True)
        if n > 1 and areas[0] < LARGEST_MARGIN * areas[1]:
            continue
        if _place(rng, objs, size):
            return objs


def _place(rng: np.random.Generator, objs: list[dict[str, Any]], size: int, tries: int = 64) -> bool:
    """Give each object a centre, biggest first, keeping boxes apart; False if one does not fit."""
    margin, gap = _MARGIN * size, _GAP * size
    placed: list[tuple[float, float, float, float]] = []
    for o in sorted(objs, key=lambda o: -o["r"]):
        r = o["r"]
        cx = rng.uniform(margin + r, size - margin - r, tries)
        cy = rng.uniform(margin + r, size - margin - r, tries)
        hit = 0
        if placed:
            ok = True
            for x0, y0, x1, y1 in placed:
                ok = ok & ((cx - r >= x1 + gap) | (cx + r + gap <= x0) | (cy - r >= y1 + gap) | (cy + r + gap <= y0))
            hit = int(ok.argmax())
            if not ok[hit]:
                return False
        o["cx"], o["cy"] = float(cx[hit]), float(cy[hit])
        placed.append((o["cx"] - r, o["cy"] - r, o["cx"] + r, o["cy"] + r))
    return True


def _relations(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The relations "a <rel> b" that hold strictly: a's box lies entirely on that side of b's."""
    rels = []
    if a["cx"] + a["r"] <= b["cx"] - b["r"]:
        rels.append("left of")
    if a["cx"] - a["r"] >= b["cx"] + b["r"]:
        rels.append("right of")
    if a["cy"] + a["r"] <= b["cy"] - b["r"]:
        rels.append("above")
    if a["cy"] - a["r"] >= b["cy"] + b["r"]:
        rels.append("below")
    return rels


def _mention(o: dict[str, Any], with_size: bool) -> str:
    return f"a {o['size']} {o['colour']} {o['shape']}" if with_size else f"a {o['colour']} {o['shape']}"


def _draw_caption(rng: np.random.Generator, objs: list[dict[str, Any]], split: str) -> tuple[str, dict[str, Any]]:
    """Pick one object (or an ordered pair and a relation that holds) and write its caption."""
    n = len(objs)
    i = 0 if split == "eval-heldout" else _pick(rng, n)
    if n == 1:
        sizes = [bool(rng.random() < 0.5)]
        return _mention(objs[i], sizes[0]), {"objects": [i], "relation": None, "sizes": sizes}
    j = _pick(rng, n - 1)
    j += j >= i
    rels = _relations(objs[i], objs[j])
    rel = rels[_pick(rng, len(rels))]
    sizes = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)]
    text = f"{_mention(objs[i], sizes[0])} {rel} {_mention(objs[j], sizes[1])}"
    return text, {"objects": [i, j], "relation": rel, "sizes": sizes}


def render_scene(objects: Sequence[dict[str, Any]], size: int, background: Sequence[float] = (100, 100, 100),
                 gradient: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Render objects (dicts with shape, colour, r, cx, cy in pixels) over a shaded background.

    The background is ``background + gradient[0] * (x/size - 1/2) + gradient[1] * (y/size - 1/2)``.
    Returns the uint8 image and the segmentation (0 background, ``class_id + 1`` where coverage >= 1/2).
    """
    pix = np.arange(size, dtype=np.float64) + 0.5
    centres = pix / size - 0.5
    img = np.asarray(background, np.float64) + gradient[0] * centres[None, :, None] + gradient[1] * centres[:, None, None]
    seg = np.zeros((size, size), np.int64)
    for o in objects:
        r, cx, cy = o["r"], o["cx"], o["cy"]
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
        cov = shape_coverage(o["shape"], cx, cy, r, pix[None, x0:x1], pix[y0:y1, None])
        win = img[y0:y1, x0:x1]
        win += cov[..., None] * (_PALETTE_F64[o["colour"]] - win)
        seg[y0:y1, x0:x1][cov >= 0.5] = class_id(o["shape"], o["colour"]) + 1
    # blends of in-range colours stay in 0..255, so rounding is the only quantization
    return np.rint(img).astype(np.uint8), seg


def _draw_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random rectangle covering about 25-50 % of the image (True = unknown)."""
    u = rng.random(3)
    area = (0.25 + 0.25 * u[0]) * size * size
    w = min(max(round(math.sqrt(area) * (0.7 + 0.7 * u[1])), size // 4), size)
    h = min(max(round(area / w), size // 4), size)
    x0, y0 = _pick(rng, size - w + 1), _pick(rng, size - h + 1)
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask


def _check_args(split: str, size: int, seed: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(size, int) or size < 16 or size % 4:
        raise ValueError(f"size must be an int multiple of 4 and >= 16, got {size!r}")
    if size > MAX_SIZE:
        raise ValueError(f"size {size} is above the shapes world's limit of {MAX_SIZE} pixels: rendering one scene "
                         f"would need about {size * size * 3 * 8 * 6 / 2**30:,.1f} GiB")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _coin(seed: int, split: str, index: int) -> float:
    """A uniform number in [0, 1) for scene ``index``, from a stream apart from the scene's own."""
    return float(np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([seed, SPLIT_CODE[split], index, 1]))).random())


def _captioned_fraction(value: bool | float) -> float:
    """``only_captioned`` as the fraction of scenes drawn with only their captioned objects (True: 1.0)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise ValueError(f"only_captioned must be true, false or a fraction of scenes between 0.0 and 1.0, "
                     f"got {value!r}")


def make_scene(seed: int, split: str, index: int, size: int = 32, only_captioned: bool | float = False) -> Sample:
    """Scene ``index`` of ``split`` for ``seed``, as a fully annotated :class:`Sample`.

    ``only_captioned``: draw only the objects the caption mentions (the others of the scene are left out;
    caption, kept objects' places and the random stream are those of the full scene), so the caption
    describes the whole image. A float ``p`` in [0, 1] does so for a fraction ``p`` of the scenes, chosen
    per index by a stream of its own (a scene is either its full self or its ``only_captioned=True`` self).
    """
    _check_args(split, size, seed)
    fraction = _captioned_fraction(only_captioned)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLIT_CODE[split], index])))
    objs = _draw_objects(rng, size, split)
    caption, cap = _draw_caption(rng, objs, split)
    if fraction == 1.0 or (fraction > 0.0 and _coin(seed, split, index) < fraction):
        objs = [objs[i] for i in cap["objects"]]
        cap = {**cap, "objects": list(range(len(objs)))}
    u = rng.random(6)
    background = 90.0 + 30.0 * u[0] + (10.0 * u[1:4] - 5.0)
    gradient = (16.0 * u[4] - 8.0, 16.0 * u[5] - 8.0)
    image, seg = render_scene(objs, size, background, gradient)
    mask = _draw_mask(rng, size)
    largest = max(objs, key=lambda o: AREA_FACTOR[o["shape"]] * o["r"] ** 2)
    meta_objs, boxes = [], []
    for o in objs:
        r, cx, cy = o["r"], o["cx"], o["cy"]
        box = ((cx - r) / size, (cy - r) / size, (cx + r) / size, (cy + r) / size)
        boxes.append(Box(f"{o['colour']} {o['shape']}", box))
        meta_objs.append({"shape": o["shape"], "colour": o["colour"], "size": o["size"],
                          "class_id": class_id(o["shape"], o["colour"]), "box": list(box)})
    return Sample(
        image=image,
        label=class_id(largest["shape"], largest["colour"]),
        caption=caption,
        boxes=boxes,
        segmentation=seg,
        lowres=area_downsample(image, 4),
        mask=mask,
        meta={"source": "shapes", "split": split, "seed": seed, "index": index, "objects": meta_objs,
              "caption": cap, "background": [float(v) for v in background]},
    )


def parse_caption(text: str) -> dict[str, Any]:
    """Invert the caption grammar: ``{"objects": [{"shape", "colour", "size" (or None)}, ...], "relation"}``.

    Raises ValueError on text outside the grammar.
    """
    words = text.strip().lower().split()
    objects, relation, pos = [], None, 0

    def mention() -> dict[str, Any]:
        nonlocal pos
        if pos >= len(words) or words[pos] != "a":
            raise ValueError(f"caption {text!r}: expected 'a' at word {pos}")
        pos += 1
        size = None
        if pos < len(words) and words[pos] in SIZES:
            size, pos = words[pos], pos + 1
        if pos + 2 > len(words) or words[pos] not in COLOURS or words[pos + 1] not in SHAPES:
            raise ValueError(f"caption {text!r}: expected '<colour> <shape>' at word {pos}; "
                             f"colours {COLOURS}, shapes {SHAPES}")
        colour, shape = words[pos], words[pos + 1]
        pos += 2
        return {"shape": shape, "colour": colour, "size": size}

    objects.append(mention())
    if pos < len(words):
        rest = " ".join(words[pos:pos + 2])
        one = words[pos]
        if rest in RELATIONS:
            relation, pos = rest, pos + 2
        elif one in RELATIONS:
            relation, pos = one, pos + 1
        else:
            raise ValueError(f"caption {text!r}: expected one of {RELATIONS} at word {pos}")
        objects.append(mention())
    if pos != len(words):
        raise ValueError(f"caption {text!r}: unexpected words after position {pos}")
    return {"objects": objects, "relation": relation}


class ShapesWorld(Sequence[Sample]):
    """A fixed, deterministic sequence of shapes-world scenes.

    Args:
        split: one of :data:`SPLITS`.
        size: image side in pixels, a multiple of 4 and at least 16 (32 default; 64 and up work).
        seed: selects the world; scene ``i`` depends only on ``(seed, split, i, size)``.
        length: number of scenes (default 1,000,000 for training splits, 100,000 for eval splits).
        only_captioned: draw only the objects each caption mentions (see :func:`make_scene`): training
            data whose captions describe the whole image; a float in [0, 1] does so for that fraction of
            the scenes (e.g. 0.5 for a composed model whose layout and semantic maps also need full scenes).
    """

    def __init__(self, split: str = "train", size: int = 32, seed: int = 0, length: int | None = None,
                 only_captioned: bool | float = False):
        _check_args(split, size, seed)
        length = DEFAULT_LENGTH[split] if length is None else length
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        _captioned_fraction(only_captioned)
        self.split, self.size, self.seed, self.length = split, size, seed, length
        self.only_captioned = only_captioned

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("ShapesWorld does not support slicing; use [world[i] for i in range(...)]")
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesWorld of length {self.length}")
        return make_scene(self.seed, self.split, index, self.size, self.only_captioned)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(self.length))

    def __repr__(self) -> str:
        extra = f", only_captioned={self.only_captioned!r}" if self.only_captioned else ""
        return f"ShapesWorld(split={self.split!r}, size={self.size}, seed={self.seed}, length={self.length}{extra})"
