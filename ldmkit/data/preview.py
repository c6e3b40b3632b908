"""Look at a data set (:func:`preview_grid`) and write any samples out as a manifest (:func:`export`).

``preview_grid`` draws one cell per sample: the image upscaled ``scale`` times (nearest neighbour) with
its boxes outlined and labelled; to its right, a column of small panels for whichever of
``segmentation`` (coloured by :func:`colorize_segmentation`), ``mask`` (white = to inpaint) and
``lowres`` any sample in the grid has; underneath, ``#index  label N`` and the caption, word-wrapped.

``export`` writes ``images/00000.png`` (and ``segmentations/``, ``masks/`` when present) plus a
``manifest.jsonl`` that :class:`~ldmkit.data.manifest.ManifestDataset` reads back to the same pixels,
captions, labels, boxes, segmentations and masks (``lowres`` and ``meta`` are not exported).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from ldmkit.data.base import Sample
from ldmkit.data.manifest import ManifestRecord, _format_validation_error

__all__ = ["preview_grid", "image_rows", "export", "colorize_segmentation", "segmentation_palette", "condition_panel"]

_MARGIN = 6  # pixels between cells and around the grid
_GAP = 4  # pixels between an image and its panel column, and between panels
_PANEL_KEYS = ("segmentation", "mask", "lowres")
_PANEL_TITLES = {"segmentation": "seg", "mask": "mask", "lowres": "lowres"}
_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def segmentation_palette(n: int = 256) -> np.ndarray:
    """``n x 3`` uint8 colours for class ids: 0 (background) is dark grey, then well-spread hues."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    colours[0] = (40, 40, 40)
    for i in range(1, n):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours' hues apart
        value = 0.95 if i % 2 else 0.75
        colours[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.8, value)]
    return colours


_PALETTE = segmentation_palette()


def colorize_segmentation(segmentation: np.ndarray) -> np.ndarray:
    """``H x W`` class ids -> ``H x W x 3`` uint8 colours (ids wrap around after 255)."""
    ids = np.asarray(segmentation)
    if ids.ndim != 2:
        raise ValueError(f"segmentation must be H x W class ids; got shape {ids.shape}")
    return _PALETTE[np.mod(ids.astype(np.int64), len(_PALETTE))]


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:  # cut over-long words
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _upscale(pixels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)


def _check_image(sample: Any, index: int) -> np.ndarray:
    if not isinstance(sample, Sample):
        raise TypeError(f"sample {index}: expected an ldmkit Sample, got {type(sample).__name__}")
    image = np.asarray(sample.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {index}: image must be H x W x 3 uint8; got {image.shape} {image.dtype}")
    return image


def condition_panel(value: Any, key: str, size: tuple[int, int]) -> np.ndarray:
    """An ``H x W x 3`` uint8 picture of one condition, to show an input beside what it produced.

    ``boxes``: outlines on grey, in the colour the label names when it names one (``"red circle"``);
    ``segmentation``: coloured class ids; ``lowres``: the low-res image enlarged (nearest); ``mask``:
    white = unknown; an ``{"image", "mask"}`` value (inpainting): the image with the unknown region
    black. Other values (labels, captions) have no picture: a plain grey panel (label the row instead).
    """
    h, w = size
    canvas = Image.new("RGB", (w, h), (100, 100, 100))
    if key == "boxes" and value:
        from ldmkit.data.shapes import PALETTE

        draw = ImageDraw.Draw(canvas)
        for j, box in enumerate(value):
            label = box["label"] if isinstance(box, dict) else box.label
            x0, y0, x1, y1 = box["bbox"] if isinstance(box, dict) else box.bbox
            named = [c for c in PALETTE if isinstance(label, str) and c in label.split()]
            colour = PALETTE[named[0]] if named else _BOX_COLOURS[j % len(_BOX_COLOURS)]
            draw.rectangle((x0 * w, y0 * h, max(x0 * w, x1 * w - 1), max(y0 * h, y1 * h - 1)), outline=colour)
        return np.asarray(canvas)
    if isinstance(value, dict) and {"image", "mask"} <= set(value):
        image = np.asarray(value["image"], dtype=np.uint8).copy()
        image[np.asarray(value["mask"], dtype=bool)] = 0
        return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST))
    if key == "segmentation" and value is not None:
        return np.asarray(_upscale(colorize_segmentation(value), (w, h)))
    if key == "mask" and value is not None:
        return np.asarray(_upscale(np.where(np.asarray(value, dtype=bool), 255, 0).astype(np.uint8), (w, h)).convert("RGB"))
    if key == "lowres" and value is not None:
        return np.asarray(_upscale(np.asarray(value, dtype=np.uint8), (w, h)))
    return np.asarray(canvas)


def image_rows(rows: list[np.ndarray], labels: list[str] | None = None, *, scale: int = 4) -> Image.Image:
    """Rows of equally sized ``H x W x 3`` uint8 images, upscaled ``scale`` times, each row labelled on the left.

    ``rows[r]`` is an array ``(n_r, H, W, 3)`` (or a list of images); ``labels[r]`` is written before it.
    Used for reconstruction and sample sheets (one row per model, per class, per sampler ...).
    """
    if not rows:
        raise ValueError("rows is empty; nothing to draw")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    if not isinstance(scale, int) or isinstance(scale, bool) or not 1 <= scale <= 32:
        raise ValueError(f"scale must be an integer in 1..32; got {scale!r}")
    rows = [np.asarray(r) for r in rows]
    shapes = {r.shape[1:] for r in rows}
    if len(shapes) != 1 or any(r.ndim != 4 or r.shape[-1] != 3 or r.dtype != np.uint8 for r in rows):
        raise ValueError(f"every row must be (n, H, W, 3) uint8 images of one size; got {[r.shape for r in rows]}")
    h, w = (d * scale for d in rows[0].shape[1:3])
    font = ImageFont.load_default()
    label_w = int(max((font.getlength(t) for t in labels or []), default=0)) + (_MARGIN if labels else 0)
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (label_w + ncols * (w + _GAP) + _MARGIN * 2 - _GAP, len(rows) * (h + _GAP) + _MARGIN * 2 - _GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = _MARGIN + r * (h + _GAP)
        if labels:
            draw.text((_MARGIN, y + h // 2 - 6), labels[r], fill="black", font=font)
        for c, im in enumerate(row):
            sheet.paste(_upscale(im, (w, h)), (_MARGIN + label_w + c * (w + _GAP), y))
    return sheet


def preview_grid(
    samples: Iterable[Sample], *, cols: int = 8, scale: int = 4, caption_lines: int = 4
) -> Image.Image:
    """A labelled contact sheet of ``samples`` (see the module docstring for what a cell shows).

    Args:
        samples: the samples to show (any iterable; all of it is drawn).
        cols: cells per row, >= 1 (fewer when there are fewer samples).
        scale: integer upscaling of each image, 1..32.
        caption_lines: at most this many caption lines per cell (longer captions end in "...").

    Size: with ``W x H`` the largest image, ``k = max(2, number of panel kinds)``, panel column width
    ``pw = W*scale // k`` (0 without panels, else plus a 4 px gap), and ``L`` text lines of 13 px::

        cell = (W*scale + pw, H*scale + 4 + 13*L);  grid = (c*cell_w + 6*(c+1), r*cell_h + 6*(r+1))

    where ``c = min(cols, n)``, ``r = ceil(n / c)`` and ``L = 1 + the most caption lines used``.
    """
    items = list(samples)
    if not items:
        raise ValueError("samples is empty; nothing to preview")
    if not isinstance(cols, int) or isinstance(cols, bool) or cols < 1:
        raise ValueError(f"cols must be a positive integer; got {cols!r}")
    if not isinstance(scale, int) or isinstance(scale, bool) or not 1 <= scale <= 32:
        raise ValueError(f"scale must be an integer in 1..32; got {scale!r}")
    if not isinstance(caption_lines, int) or isinstance(caption_lines, bool) or caption_lines < 0:
        raise ValueError(f"caption_lines must be a non-negative integer; got {caption_lines!r}")
    images = [_check_image(s, i) for i, s in enumerate(items)]
    font = ImageFont.load_default()
    line_h = 13
    img_w = max(im.shape[1] for im in images) * scale
    img_h = max(im.shape[0] for im in images) * scale
    panel_keys = [k for k in _PANEL_KEYS if any(s.get(k) is not None for s in items)]
    k = max(2, len(panel_keys))
    panel_w, panel_h = img_w // k, (img_h - _GAP * (k - 1)) // k
    column_w = _GAP + panel_w if panel_keys else 0

    captions: list[list[str]] = []
    for s in items:
        lines = _wrap(s.caption, font, img_w + column_w) if s.caption else []
        if len(lines) > caption_lines:
            lines = lines[:caption_lines]
            lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
        captions.append(lines)
    text_lines = 1 + max(len(c) for c in captions)
    cell_w, cell_h = img_w + column_w, img_h + _GAP + line_h * text_lines
    ncols = min(cols, len(items))
    nrows = math.ceil(len(items) / ncols)
    sheet = Image.new("RGB", (ncols * cell_w + _MARGIN * (ncols + 1), nrows * cell_h + _MARGIN * (nrows + 1)), "white")
    draw = ImageDraw.Draw(sheet)

    for i, (sample, image, lines) in enumerate(zip(items, images, captions)):
        row, col = divmod(i, ncols)
        x = _MARGIN + col * (cell_w + _MARGIN)
        y = _MARGIN + row * (cell_h + _MARGIN)
        w, h = image.shape[1] * scale, image.shape[0] * scale
        sheet.paste(_upscale(image, (w, h)), (x, y))
        for j, box in enumerate(sample.boxes or []):
            colour = _BOX_COLOURS[j % len(_BOX_COLOURS)]
            x0, y0, x1, y1 = box.bbox
            rect = (x + x0 * w, y + y0 * h, x + max(x0 * w, x1 * w - 1), y + max(y0 * h, y1 * h - 1))
            draw.rectangle(rect, outline=colour, width=max(1, scale // 2))
            tx, ty = rect[0] + 1, rect[1] + 1
            draw.rectangle(draw.textbbox((tx, ty), box.label, font=font), fill=colour)
            draw.text((tx, ty), box.label, fill="white", font=font)
        for p, key in enumerate(panel_keys):
            value = sample.get(key)
            px, py = x + img_w + _GAP, y + p * (panel_h + _GAP)
            if value is None:
                draw.rectangle((px, py, px + panel_w - 1, py + panel_h - 1), outline=(200, 200, 200))
                continue
            if key == "segmentation":
                pixels = colorize_segmentation(value)
            elif key == "mask":
                pixels = np.where(np.asarray(value, dtype=bool), 255, 0).astype(np.uint8)
            else:
                pixels = np.asarray(value, dtype=np.uint8)
            sheet.paste(_upscale(pixels, (panel_w, panel_h)), (px, py))
            title = _PANEL_TITLES[key]
            draw.rectangle(draw.textbbox((px + 1, py + 1), title, font=font), fill="white")
            draw.text((px + 1, py + 1), title, fill="black", font=font)
        ty = y + img_h + _GAP
        header = f"#{i}" + (f"  label {sample.label}" if sample.label is not None else "")
        draw.text((x, ty), header, fill=(90, 90, 90), font=font)
        for n, line in enumerate(lines, start=1):
            draw.text((x, ty + n * line_h), line, fill="black", font=font)
    return sheet


def _save_ids(segmentation: np.ndarray, shape: tuple[int, ...], path: Path, index: int) -> None:
    ids = np.asarray(segmentation)
    if ids.shape != shape or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"sample {index}: segmentation must be {shape[0]} x {shape[1]} integers (the image's size); "
            f"got {ids.shape} {ids.dtype}"
        )
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError(f"sample {index}: segmentation ids must be in 0..65535 to fit a PNG")
    if ids.size == 0 or ids.max() < 256:
        Image.fromarray(ids.astype(np.uint8)).save(path)  # mode L
    else:
        Image.fromarray(ids.astype(np.uint16)).save(path)  # mode I;16


def export(samples: Iterable[Sample], out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``samples`` as PNG files and a ``manifest.jsonl`` in ``out_dir``; return the manifest's path.

    Layout: ``images/00000.png``, ``segmentations/00000.png`` (mode L, or I;16 for ids above 255),
    ``masks/00000.png`` (0 / 255) and ``manifest.jsonl`` with paths relative to ``out_dir``.
    Refuses to write over an existing export unless ``overwrite=True`` (which first removes the old
    ``manifest.jsonl``, ``images/``, ``segmentations/`` and ``masks/``).
    """
    root = Path(out_dir)
    manifest = root / "manifest.jsonl"
    folders = {key: root / key for key in ("images", "segmentations", "masks")}
    if manifest.exists() or any(f.exists() for f in folders.values()):
        if not overwrite:
            raise FileExistsError(f"{root} already holds an export; pass overwrite=True to replace it")
        manifest.unlink(missing_ok=True)
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    folders["images"].mkdir(parents=True)
    lines: list[str] = []
    for i, sample in enumerate(samples):
        image = _check_image(sample, i)
        name = f"{i:05d}.png"
        record: dict[str, Any] = {"image": f"images/{name}"}
        if sample.caption is not None:
            record["caption"] = sample.caption
        if sample.label is not None:
            record["label"] = int(sample.label)
        if sample.boxes is not None:
            record["boxes"] = [{"label": b.label, "bbox": [float(v) for v in b.bbox]} for b in sample.boxes]
        if sample.segmentation is not None:
            record["segmentation"] = f"segmentations/{name}"
        if sample.mask is not None:
            record["mask"] = f"masks/{name}"
        try:
            ManifestRecord.model_validate(record)
        except ValidationError as err:
            reasons = "; ".join(_format_validation_error(err))
            raise ValueError(f"sample {i} cannot be written as a manifest record: {reasons}") from err
        Image.fromarray(image).save(folders["images"] / name)
        if sample.segmentation is not None:
            folders["segmentations"].mkdir(exist_ok=True)
            _save_ids(sample.segmentation, image.shape[:2], folders["segmentations"] / name, i)
        if sample.mask is not None:
            folders["masks"].mkdir(exist_ok=True)
            mask = np.asarray(sample.mask)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"sample {i}: mask shape {mask.shape} differs from the image's {image.shape[:2]}")
            Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8)).save(folders["masks"] / name)
        lines.append(json.dumps(record, ensure_ascii=False))
    partial = manifest.with_suffix(".jsonl.partial")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    partial.replace(manifest)
    return manifest
