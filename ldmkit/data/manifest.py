"""Your own data: a folder of images, or a JSONL manifest of images with any ground truth.

**Folder** (:class:`FolderDataset`): every ``.png``, ``.jpg``, ``.jpeg`` and ``.webp`` file directly in
the folder (or below it with ``recursive=True``), in sorted order, with no ground truth.

**Manifest** (:class:`ManifestDataset`): a UTF-8 text file with one JSON object per line, validated by
:class:`ManifestRecord`::

    {"image": "images/cat.png", "caption": "a cat on a sofa", "label": 3,
     "boxes": [{"label": "cat", "bbox": [0.1, 0.2, 0.6, 0.9]}],
     "segmentation": "seg/cat.png", "mask": "masks/cat.png"}

Only ``image`` is required. Fields declared by installed plugins (:class:`ldmkit.ConditionField`, listed
by ``ldmkit plugins``) are accepted too, validated by the field's type and stored in ``Sample.fields``,
e.g. ``{"image": "a.png", "palette": ["red", "blue"]}``. Paths are relative to the manifest's folder (absolute paths also work).
``bbox`` is ``[x0, y0, x1, y1]`` normalized to 0..1 (x right, y down) with ``x0 < x1`` and ``y0 < y1``.
``segmentation`` is a single-channel PNG (mode L, P, I or I;16) whose pixel values are class ids;
``mask`` is a PNG whose non-zero (non-black) pixels mark the region to inpaint. Both must have the
image's size. Blank lines are ignored; anything else that is wrong is an error naming the file, the
line, the field and the reason, e.g. ``manifest.jsonl:3: boxes.0.bbox: x0 must be < x1`` -- unless
``skip_invalid=True``, which skips such lines and counts them in ``skipped``.

Both data sets read images lazily, convert them to RGB and, when ``size`` is given, make them
``size x size``: ``fit="crop"`` (default) takes the centre square first (boxes are re-mapped into it,
clipped, and dropped when nothing is left, counted in ``meta["dropped_boxes"]``); ``fit="squash"``
resizes the whole image, distorting its aspect ratio but keeping every box.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from ldmkit.data.base import Box, Sample, SampleSequence

__all__ = [
    "BoxRecord",
    "ManifestRecord",
    "ManifestError",
    "ManifestDataset",
    "FolderDataset",
    "IMAGE_SUFFIXES",
    "manifest_json_schema",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FITS = ("crop", "squash")
_SEGMENTATION_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")
_MAX_REPORTED = 20

Unit = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]


class BoxRecord(BaseModel):
    """One labelled box of a manifest line."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, description="What the box contains, e.g. 'red circle'.")
    bbox: tuple[Unit, Unit, Unit, Unit] = Field(
        description="[x0, y0, x1, y1] normalized to 0..1, x to the right, y down; x0 < x1, y0 < y1."
    )

    @field_validator("bbox", mode="before")
    @classmethod
    def _four_numbers(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise ValueError("must be [x0, y0, x1, y1]: a list of 4 numbers in 0..1")
        return value

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = value
        if not x0 < x1:
            raise ValueError(f"x0 must be < x1 (got x0={x0}, x1={x1})")
        if not y0 < y1:
            raise ValueError(f"y0 must be < y1 (got y0={y0}, y1={y1})")
        return value


class ManifestRecord(BaseModel):
    """One line of an ldmkit JSONL manifest: an image and any of its ground truth."""

    model_config = ConfigDict(extra="forbid", title="ldmkit manifest record")

    image: str = Field(min_length=1, description="Image file (PNG, JPEG, WebP), relative to the manifest's folder.")
    caption: str | None = Field(default=None, description="A text description of the image.")
    label: StrictInt | None = Field(default=None, ge=0, description="An integer class id.")
    boxes: list[BoxRecord] | None = Field(default=None, description="Labelled boxes (layout).")
    segmentation: str | None = Field(
        default=None, min_length=1, description="Single-channel PNG of per-pixel class ids, the image's size."
    )
    mask: str | None = Field(
        default=None, min_length=1, description="PNG, the image's size; non-zero pixels are to be inpainted."
    )


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of one manifest line (:class:`ManifestRecord`)."""
    schema = ManifestRecord.model_json_schema()
    schema["description"] = (
        "One line of an ldmkit JSONL manifest. Paths are relative to the manifest's folder; "
        "bbox coordinates are normalized to 0..1 with x0 < x1 and y0 < y1."
    )
    return schema


class ManifestError(ValueError):
    """A manifest (or image folder) is unusable; ``problems`` lists every ``file:line: field: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:_MAX_REPORTED]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more else [])))


def _format_validation_error(err: ValidationError, plugin_fields: tuple[str, ...] = ()) -> list[str]:
    out = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"])
        kind, msg = item["type"], item["msg"]
        if kind == "extra_forbidden":
            nested = len(item["loc"]) > 1
            allowed = list((BoxRecord if nested else ManifestRecord).model_fields)
            if not nested and plugin_fields:
                allowed += [f"{', '.join(plugin_fields)} (declared by plugins)"]
            msg = f"unknown field (allowed: {', '.join(allowed)})"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "model_type":
            msg = "must be a JSON object"
        msg = msg.removeprefix("Value error, ")
        out.append(f"{field}: {msg}" if field else msg)
    return out


def _check_args(size: int | None, fit: str) -> None:
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096):
        raise ValueError(f"size must be None or an integer in 1..4096; got {size!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")


def _centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _fit_boxes(
    boxes: list[Box], crop: tuple[int, int, int, int], width: int, height: int
) -> tuple[list[Box], int]:
    """Re-express normalized ``boxes`` in the pixel ``crop`` of a ``width x height`` image."""
    left, top, right, bottom = crop
    kept: list[Box] = []
    for box in boxes:
        x0, y0, x1, y1 = box.bbox
        nx0 = min(max((x0 * width - left) / (right - left), 0.0), 1.0)
        nx1 = min(max((x1 * width - left) / (right - left), 0.0), 1.0)
        ny0 = min(max((y0 * height - top) / (bottom - top), 0.0), 1.0)
        ny1 = min(max((y1 * height - top) / (bottom - top), 0.0), 1.0)
        if nx0 < nx1 and ny0 < ny1:
            kept.append(Box(box.label, (nx0, ny0, nx1, ny1)))
    return kept, len(boxes) - len(kept)


class _Loader:
    """Reads, crops and resizes one image with its per-pixel annotations, the same way."""

    def __init__(self, size: int | None, fit: str) -> None:
        self.size, self.fit = size, fit

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        if self.size is None or self.fit == "squash":
            return 0, 0, width, height
        return _centre_square(width, height)

    def apply(self, image: Image.Image, crop: tuple[int, int, int, int], resample: Image.Resampling) -> Image.Image:
        if crop != (0, 0, *image.size):
            image = image.crop(crop)
        if self.size is not None and image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample)
        return image


#: Largest image a data set decodes (pixels): more is refused before decoding (a decompression bomb
#: of a few KB can claim gigapixels). 64 MP is a 8000 x 8000 photo.
MAX_IMAGE_PIXELS = 64_000_000


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ManifestError([f"{path}: {width}x{height} is {width * height / 1e6:,.0f} megapixels, more than "
                                     f"the {MAX_IMAGE_PIXELS / 1e6:.0f} MP a data set decodes (decoding would need "
                                     f"{width * height * 4 / 2**30:,.1f} GiB); downscale it first"])
            im.load()
            return im
    except Image.DecompressionBombError as err:
        raise ManifestError([f"{path}: refused as a decompression bomb ({err})"]) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; an image with transparency is composited onto white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class ManifestDataset(SampleSequence):
    """The images of a JSONL manifest with their captions, labels, boxes, segmentations and masks.

    Args:
        path: the ``.jsonl`` file.
        size: make every image ``size x size`` (see ``fit``); ``None`` keeps each image's own size.
        fit: ``"crop"`` (centre square, then resize) or ``"squash"`` (resize the whole image).
        skip_invalid: skip invalid lines (counted in ``skipped``, described in ``problems``) instead of
            raising :class:`ManifestError`.

    The whole file is validated up front (including that every referenced file exists); pixels are
    read when a sample is requested.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        fit: Literal["crop", "squash"] = "crop",
        skip_invalid: bool = False,
    ) -> None:
        _check_args(size, fit)
        self.path = Path(path)
        if not self.path.is_file():
            raise ManifestError([f"{self.path}: manifest file not found"])
        self.root = self.path.parent
        self.size, self.fit = size, fit
        self._loader = _Loader(size, fit)
        self.records: list[tuple[int, ManifestRecord]] = []
        self.plugin_values: dict[int, dict[str, Any]] = {}  # line number -> plugin-declared field values
        from ldmkit.registry import get_registry

        registry = get_registry()
        self._fields = registry.fields
        self._clashes = {name: registry.field_conflict_message(name) for name in registry.field_conflicts}
        self.problems: list[str] = []
        self.skipped = 0
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ManifestError([f"{self.path}: not UTF-8 text ({err.reason} at byte {err.start})"]) from err
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record, problems, values = self._parse(line)
            if problems:
                self.problems += [f"{self.path}:{number}: {p}" for p in problems]
                self.skipped += 1
            else:
                assert record is not None
                self.records.append((number, record))
                if values:
                    self.plugin_values[number] = values
        if self.problems and not skip_invalid:
            raise ManifestError(self.problems)
        if not self.records:
            note = f" ({self.skipped} invalid lines skipped)" if self.skipped else ""
            raise ManifestError([f"{self.path}: no records{note}"])

    def _parse(self, line: str) -> tuple[ManifestRecord | None, list[str], dict[str, Any]]:
        from ldmkit.types import ConditionInputError

        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            return None, [f"invalid JSON: {err.msg} at column {err.colno}"], {}
        if not isinstance(obj, dict):
            return None, [f"must be a JSON object, got {type(obj).__name__}"], {}
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key in [k for k in obj if k in self._clashes]:
            obj.pop(key)
            problems.append(f"{key}: {self._clashes[key]}")
        for key in [k for k in obj if k not in ManifestRecord.model_fields and k in self._fields]:
            try:
                values[key] = self._fields[key].validate(obj.pop(key))
            except ConditionInputError as err:
                problems.append(f"{key}: {err.problem}; allowed: {err.allowed}")
        try:
            record = ManifestRecord.model_validate(obj)
        except ValidationError as err:
            return None, problems + _format_validation_error(err, tuple(sorted(self._fields))), {}
        missing = [
            f"{key}: file not found: {getattr(record, key)} (looked at {self.root / getattr(record, key)})"
            for key in ("image", "segmentation", "mask")
            if getattr(record, key) is not None and not (self.root / getattr(record, key)).is_file()
        ]
        problems += missing
        return (None, problems, {}) if problems else (record, [], values)

    def __len__(self) -> int:
        return len(self.records)

    _noun = "manifest records"

    def _sample(self, index: int) -> Sample:
        number, record = self.records[index]
        where = f"{self.path}:{number}"

        def read(key: str) -> Image.Image:
            file = self.root / getattr(record, key)
            try:
                return _open(file)
            except (OSError, UnidentifiedImageError) as err:
                raise ManifestError([f"{where}: {key}: cannot read {file}: {err}"]) from err

        image = read("image")
        width, height = image.size
        crop = self._loader.crop_box(width, height)
        meta: dict[str, Any] = {"source": "manifest", "path": str(self.root / record.image), "line": number}
        sample = Sample(
            image=np.asarray(self._loader.apply(_to_rgb(image), crop, Image.Resampling.LANCZOS)),
            caption=record.caption,
            label=record.label,
            meta=meta,
            fields=dict(self.plugin_values.get(number, {})),
        )
        if record.boxes is not None:
            boxes = [Box(b.label, b.bbox) for b in record.boxes]
            if crop != (0, 0, width, height):
                boxes, dropped = _fit_boxes(boxes, crop, width, height)
                if dropped:
                    meta["dropped_boxes"] = dropped
            sample.boxes = boxes
        for key in ("segmentation", "mask"):
            if getattr(record, key) is None:
                continue
            annotation = read(key)
            if annotation.size != (width, height):
                raise ManifestError(
                    [f"{where}: {key}: size {annotation.size[0]}x{annotation.size[1]} differs from the "
                     f"image's {width}x{height}"]
                )
            if key == "segmentation":
                if annotation.mode not in _SEGMENTATION_MODES:
                    raise ManifestError(
                        [f"{where}: segmentation: must be a single-channel PNG of class ids "
                         f"(mode {', '.join(_SEGMENTATION_MODES)}); got mode {annotation.mode}"]
                    )
                if annotation.mode == "1":
                    annotation = annotation.convert("L")
                ids = self._loader.apply(annotation, crop, Image.Resampling.NEAREST)
                sample.segmentation = np.asarray(ids).astype(np.int64)
            else:
                if annotation.mode != "L":
                    annotation = annotation.convert("L")
                sample.mask = np.asarray(self._loader.apply(annotation, crop, Image.Resampling.NEAREST)) != 0
        return sample

    def __repr__(self) -> str:
        return f"ManifestDataset({str(self.path)!r}, size={self.size}, fit={self.fit!r}, n={len(self)})"


class FolderDataset(SampleSequence):
    """Every image file in a folder (sorted by relative path), with no ground truth.

    Args:
        root: the folder.
        size: make every image ``size x size`` (see ``fit``); ``None`` keeps each image's own size.
        fit: ``"crop"`` (centre square, then resize) or ``"squash"`` (resize the whole image).
        recursive: also take images from sub-folders.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        size: int | None = None,
        fit: Literal["crop", "squash"] = "crop",
        recursive: bool = False,
    ) -> None:
        _check_args(size, fit)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ManifestError([f"{self.root}: not a folder"])
        self.size, self.fit = size, fit
        self._loader = _Loader(size, fit)
        found = self.root.rglob("*") if recursive else self.root.iterdir()
        self.files = sorted(
            (p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise ManifestError([f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)})"])

    def __len__(self) -> int:
        return len(self.files)

    _noun = "images"

    def _sample(self, index: int) -> Sample:
        file = self.files[index]
        try:
            image = _open(file)
        except (OSError, UnidentifiedImageError) as err:
            raise ManifestError([f"{file}: cannot read image: {err}"]) from err
        crop = self._loader.crop_box(*image.size)
        pixels = np.asarray(self._loader.apply(_to_rgb(image), crop, Image.Resampling.LANCZOS))
        return Sample(image=pixels, meta={"source": "folder", "path": str(file)})

    def __repr__(self) -> str:
        return f"FolderDataset({str(self.root)!r}, size={self.size}, fit={self.fit!r}, n={len(self)})"
