"""Your own data: the JSONL manifest (validation, errors with line numbers, loading) and image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.manifest import (
    FolderDataset,
    ManifestDataset,
    ManifestError,
    ManifestRecord,
    manifest_json_schema,
)


def _image(path: Path, size: tuple[int, int] = (8, 8), colour: str = "red", mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def _manifest(root: Path, lines: list[str | dict]) -> Path:
    path = root / "manifest.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    _image(tmp_path / "img" / "a.png", (8, 8), "red")
    _image(tmp_path / "img" / "b.jpg", (8, 8), "blue")
    seg = np.zeros((8, 8), dtype=np.uint8)
    seg[2:6, 2:6] = 3
    Image.fromarray(seg).save(tmp_path / "seg.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def test_full_record_loads(files: Path) -> None:
    path = _manifest(files, [
        {"image": "img/a.png", "caption": "a red square", "label": 2,
         "boxes": [{"label": "square", "bbox": [0.25, 0.25, 0.75, 0.75]}],
         "segmentation": "seg.png", "mask": "mask.png"},
        "",  # blank lines are ignored
        {"image": "img/b.jpg"},
    ])
    data = ManifestDataset(path)
    assert len(data) == 2 and data.skipped == 0
    s = data[0]
    assert s.image.shape == (8, 8, 3) and s.image.dtype == np.uint8 and tuple(s.image[0, 0]) == (255, 0, 0)
    assert (s.caption, s.label) == ("a red square", 2)
    assert s.boxes is not None and s.boxes[0].label == "square" and s.boxes[0].bbox == (0.25, 0.25, 0.75, 0.75)
    assert s.segmentation is not None and s.segmentation.dtype == np.int64 and s.segmentation[3, 3] == 3
    assert s.mask is not None and s.mask.dtype == bool and s.mask[:, 4:].all() and not s.mask[:, :4].any()
    assert s.meta["line"] == 1
    b = data[-1]
    assert b.caption is None and b.label is None and b.boxes is None and b.mask is None
    assert b.meta["line"] == 3


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"image": "img/a.png",', "invalid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ({"caption": "no image"}, "image: required field is missing"),
        ({"image": "img/a.png", "captoin": "x"}, "captoin: unknown field (allowed: image, caption, label"),
        ({"image": "img/a.png", "label": "3"}, "label: Input should be a valid integer"),
        ({"image": "img/a.png", "label": -1}, "label: Input should be greater than or equal to 0"),
        ({"image": "img/a.png", "boxes": [{"label": "x", "bbox": [0.5, 0, 0.2, 1]}]},
         "boxes.0.bbox: x0 must be < x1"),
        ({"image": "img/a.png", "boxes": [{"label": "x", "bbox": [0, 0.5, 1, 0.5]}]},
         "boxes.0.bbox: y0 must be < y1"),
        ({"image": "img/a.png", "boxes": [{"label": "x", "bbox": [0, 0, 1.5, 1]}]},
         "boxes.0.bbox.2: Input should be less than or equal to 1"),
        ({"image": "img/a.png", "boxes": [{"label": "x", "bbox": [0, 0, 1]}]},
         "boxes.0.bbox: must be [x0, y0, x1, y1]"),
        ({"image": "img/a.png", "boxes": [{"label": "x", "bbox": [0, 0, 1, 1], "score": 1}]},
         "boxes.0.score: unknown field (allowed: label, bbox)"),
        ({"image": "img/missing.png"}, "image: file not found: img/missing.png"),
        ({"image": "img/a.png", "mask": "nope.png"}, "mask: file not found: nope.png"),
        ({"image": "img/a.png", "segmentation": "nope.png"}, "segmentation: file not found: nope.png"),
    ],
)
def test_invalid_line_names_file_line_field_and_reason(files: Path, line, expected: str) -> None:
    path = _manifest(files, [{"image": "img/a.png"}, "", line])
    with pytest.raises(ManifestError) as err:
        ManifestDataset(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert expected in str(err.value)


def test_the_documented_message_format(files: Path, monkeypatch) -> None:
    monkeypatch.chdir(files)
    _manifest(files, [{"image": "img/a.png"}, {"image": "img/b.jpg"},
                      {"image": "img/a.png", "boxes": [{"label": "x", "bbox": [0.5, 0, 0.5, 1]}]}])
    with pytest.raises(ManifestError, match=r"^manifest.jsonl:3: boxes.0.bbox: x0 must be < x1"):
        ManifestDataset("manifest.jsonl")


def test_every_invalid_line_is_reported_and_skip_invalid_counts(files: Path) -> None:
    path = _manifest(files, [
        {"image": "img/a.png"}, "not json", {"image": "img/b.jpg", "label": 1.5}, {"image": "gone.png"},
        {"image": "img/b.jpg", "caption": "ok"},
    ])
    with pytest.raises(ManifestError) as err:
        ManifestDataset(path)
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    data = ManifestDataset(path, skip_invalid=True)
    assert len(data) == 2 and data.skipped == 3 and len(data.problems) == 3
    assert [s.meta["line"] for s in data[:]] == [1, 5]


def test_empty_or_missing_manifest(files: Path) -> None:
    with pytest.raises(ManifestError, match="manifest file not found"):
        ManifestDataset(files / "absent.jsonl")
    with pytest.raises(ManifestError, match="no records"):
        ManifestDataset(_manifest(files, [""]))
    with pytest.raises(ManifestError, match=r"no records \(1 invalid lines skipped\)"):
        ManifestDataset(_manifest(files, ["{}"]), skip_invalid=True)


def test_problems_found_when_reading_name_the_line(files: Path) -> None:
    (files / "broken.png").write_bytes(b"not a png")
    _image(files / "small.png", (4, 4), "black", mode="L")
    _image(files / "rgbseg.png", (8, 8), "red")
    path = _manifest(files, [
        {"image": "broken.png"},
        {"image": "img/a.png", "mask": "small.png"},
        {"image": "img/a.png", "segmentation": "rgbseg.png"},
    ])
    data = ManifestDataset(path)  # files exist: validation passes, pixels are read lazily
    with pytest.raises(ManifestError, match=rf"^{path}:1: image: cannot read"):
        data[0]
    with pytest.raises(ManifestError, match=rf"^{path}:2: mask: size 4x4 differs from the image's 8x8"):
        data[1]
    with pytest.raises(ManifestError, match=rf"^{path}:3: segmentation: must be a single-channel PNG"):
        data[2]


def test_resize_crop_remaps_boxes_and_squash_keeps_them(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # the centre square is white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    boxes = [{"label": "centre", "bbox": [0.25, 0.0, 0.75, 1.0]}, {"label": "edge", "bbox": [0.0, 0.0, 0.2, 1.0]}]
    path = _manifest(tmp_path, [{"image": "wide.png", "boxes": boxes}])
    cropped = ManifestDataset(path, size=10)[0]
    assert cropped.image.shape == (10, 10, 3) and cropped.image.min() > 250
    assert cropped.boxes is not None and [b.label for b in cropped.boxes] == ["centre"]
    np.testing.assert_allclose(cropped.boxes[0].bbox, (0.0, 0.0, 1.0, 1.0))
    assert cropped.meta["dropped_boxes"] == 1
    squashed = ManifestDataset(path, size=10, fit="squash")[0]
    assert squashed.image.shape == (10, 10, 3) and squashed.boxes is not None and len(squashed.boxes) == 2
    with pytest.raises(ValueError, match="fit must be one of crop, squash"):
        ManifestDataset(path, fit="pad")  # type: ignore[arg-type]


def test_folder_sorted_filtered_and_transparent_on_white(tmp_path: Path) -> None:
    _image(tmp_path / "b.png", (6, 6), "blue")
    _image(tmp_path / "a.JPG", (6, 6), "red")
    _image(tmp_path / "c.webp", (6, 6), "green")
    _image(tmp_path / "d.png", (6, 6), (0, 0, 0, 0), mode="RGBA")
    (tmp_path / "notes.txt").write_text("ignored")
    _image(tmp_path / "sub" / "e.png", (6, 6), "red")
    data = FolderDataset(tmp_path)
    assert [Path(p).name for p in data.files] == ["a.JPG", "b.png", "c.webp", "d.png"]
    assert data[3].image.min() == 255  # transparent -> white
    assert data[0].meta["source"] == "folder"
    assert len(FolderDataset(tmp_path, recursive=True)) == 5
    assert FolderDataset(tmp_path, size=12)[0].image.shape == (12, 12, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no image files"):
        FolderDataset(tmp_path / "empty")
    with pytest.raises(ManifestError, match="not a folder"):
        FolderDataset(tmp_path / "absent")


def test_json_schema() -> None:
    schema = manifest_json_schema()
    json.dumps(schema)
    assert schema["required"] == ["image"]
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"image", "caption", "label", "boxes", "segmentation", "mask"}
    assert schema == {**ManifestRecord.model_json_schema(), "description": schema["description"]}
