"""Preview grids and export -> manifest round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import load_dataset
from ldmkit.data.base import Box, Sample
from ldmkit.data.manifest import ManifestDataset
from ldmkit.data.preview import colorize_segmentation, export, image_rows, preview_grid
from ldmkit.data.shapes import ShapesWorld


def _assert_same(original: Sample, loaded: Sample) -> None:
    np.testing.assert_array_equal(original.image, loaded.image)
    assert loaded.caption == original.caption
    assert loaded.label == original.label
    if original.boxes is None:
        assert loaded.boxes is None
    else:
        assert loaded.boxes is not None
        assert [b.label for b in loaded.boxes] == [b.label for b in original.boxes]
        np.testing.assert_allclose([b.bbox for b in loaded.boxes], [b.bbox for b in original.boxes], atol=1e-9)
    for key in ("segmentation", "mask"):
        if original.get(key) is None:
            assert loaded.get(key) is None
        else:
            np.testing.assert_array_equal(loaded.get(key), original.get(key))


def test_shapes_world_round_trip(tmp_path: Path) -> None:
    world = ShapesWorld("train", size=32, seed=0, length=12)
    samples = [world[i] for i in range(12)]
    manifest = export(samples, tmp_path / "out")
    assert manifest == tmp_path / "out" / "manifest.jsonl"
    assert (tmp_path / "out" / "images" / "00011.png").is_file()
    assert (tmp_path / "out" / "segmentations" / "00000.png").is_file()
    assert (tmp_path / "out" / "masks" / "00000.png").is_file()
    loaded = load_dataset(manifest, size=None)
    assert len(loaded) == 12
    for original, back in zip(samples, loaded):
        _assert_same(original, back)
    # the same through the size=32 default of load_dataset (square 32 px images: untouched)
    _assert_same(samples[3], load_dataset(manifest)[3])


def test_hand_made_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    ids = rng.integers(0, 1000, (6, 10)).astype(np.int64)  # above 255: written as 16-bit
    samples = [
        Sample(image=wide, caption="ünïcode ✓ caption", label=0, boxes=[Box("a", (0.1, 0.2, 0.3, 0.4))],
               segmentation=ids, mask=ids > 500),
        Sample(image=rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)),
        Sample(image=np.zeros((4, 4, 3), np.uint8), boxes=[]),
    ]
    manifest = export(samples, tmp_path)
    first = json.loads(manifest.read_text(encoding="utf-8").splitlines()[0])
    assert first["caption"] == "ünïcode ✓ caption"
    with Image.open(tmp_path / "segmentations" / "00000.png") as written:
        assert written.mode.startswith("I")  # 16-bit
    loaded = ManifestDataset(manifest)
    for original, back in zip(samples, loaded):
        _assert_same(original, back)


def test_export_refuses_to_overwrite_and_validates(tmp_path: Path) -> None:
    world = ShapesWorld("eval", length=3)
    export([world[0], world[1], world[2]], tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export([world[0]], tmp_path)
    export([world[0]], tmp_path, overwrite=True)
    assert len(ManifestDataset(tmp_path / "manifest.jsonl")) == 1
    assert not (tmp_path / "images" / "00001.png").exists()
    bad = Sample(image=np.zeros((4, 4, 3), np.uint8), boxes=[Box("flat", (0.5, 0.1, 0.5, 0.9))])
    with pytest.raises(ValueError, match="sample 0 cannot be written.*x0 must be < x1"):
        export([bad], tmp_path / "bad")
    with pytest.raises(ValueError, match="sample 0: image must be H x W x 3 uint8"):
        export([Sample(image=np.zeros((4, 4), np.uint8))], tmp_path / "bad2")


def _expected_size(n: int, cols: int, side: int, scale: int, panels: int, text_lines: int) -> tuple[int, int]:
    img = side * scale
    column = (4 + img // max(2, panels)) if panels else 0
    cell_w, cell_h = img + column, img + 4 + 13 * text_lines
    c = min(cols, n)
    r = math.ceil(n / c)
    return c * cell_w + 6 * (c + 1), r * cell_h + 6 * (r + 1)


def test_preview_grid_size_with_and_without_panels() -> None:
    world = ShapesWorld("train", length=10)
    samples = [world[i] for i in range(10)]
    grid = preview_grid(samples, cols=4, scale=4, caption_lines=4)
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    # three panel kinds (segmentation, mask, lowres); captions wrap to 1-4 lines: the width is exact
    candidates = [_expected_size(10, 4, 32, 4, 3, 1 + lines) for lines in range(1, 5)]
    assert grid.width == candidates[0][0]
    assert grid.size in candidates
    plain = [Sample(image=np.full((16, 16, 3), 200, np.uint8), label=i) for i in range(3)]
    assert preview_grid(plain, cols=8, scale=2).size == _expected_size(3, 8, 16, 2, 0, 1)
    captioned = [Sample(image=np.zeros((8, 8, 3), np.uint8), caption="word " * 40)]
    assert preview_grid(captioned, scale=8, caption_lines=3).size == _expected_size(1, 8, 8, 8, 0, 4)


def test_preview_draws_boxes_and_panels() -> None:
    sample = Sample(
        image=np.full((16, 16, 3), 128, np.uint8),
        boxes=[Box("thing", (0.25, 0.25, 0.75, 0.75))],
        segmentation=np.ones((16, 16), np.int64),
        mask=np.ones((16, 16), bool),
    )
    grid = np.asarray(preview_grid([sample], scale=4))
    image_area = grid[6 : 6 + 64, 6 : 6 + 64]
    assert (image_area != 128).any(axis=2).sum() > 50  # the outline and its label
    panel_x = 6 + 64 + 4
    seg_panel = grid[6 + 20 : 6 + 28, panel_x + 20 : panel_x + 28]
    assert (seg_panel == colorize_segmentation(np.ones((1, 1), np.int64))[0, 0]).all()
    mask_panel = grid[6 + 30 + 4 + 20 : 6 + 30 + 4 + 28, panel_x + 20 : panel_x + 28]
    assert (mask_panel == 255).all()


def test_preview_argument_errors() -> None:
    with pytest.raises(ValueError, match="samples is empty"):
        preview_grid([])
    one = [Sample(image=np.zeros((4, 4, 3), np.uint8))]
    with pytest.raises(ValueError, match="cols must be a positive integer"):
        preview_grid(one, cols=0)
    with pytest.raises(ValueError, match="scale must be an integer in 1..32"):
        preview_grid(one, scale=0)
    assert colorize_segmentation(np.arange(6).reshape(2, 3)).shape == (2, 3, 3)


def test_image_rows_lays_out_labelled_rows_and_rejects_mixed_sizes():
    a = np.zeros((3, 8, 8, 3), np.uint8)
    b = np.full((2, 8, 8, 3), 255, np.uint8)
    sheet = np.asarray(image_rows([a, b], ["zeros", "ones"], scale=2))
    unlabelled = np.asarray(image_rows([a, b], scale=2))
    assert sheet.shape[0] == unlabelled.shape[0] and sheet.shape[1] > unlabelled.shape[1]  # room for labels
    # the first row holds three black 16x16 cells, the second two white ones and white after them
    assert (unlabelled[6:22, 6:22] == 0).all() and (unlabelled[6:22, 46:62] == 0).all()
    assert (unlabelled[26:42, 46:62] == 255).all()
    with pytest.raises(ValueError, match="one size"):
        image_rows([a, np.zeros((1, 4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        image_rows([a], ["x", "y"])
