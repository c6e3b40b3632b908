"""The scene parser: calibrated on clean renders, sensible on blurred, noisy and junk images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ldmkit.data.base import Sample
from ldmkit.data.shapes import SHAPES, ShapesWorld, render_scene
from ldmkit.metrics.shapes import _match, _truth, is_clean, parse_scene, parse_scene_details, semantic_map


def degrade(image: np.ndarray, blur: float = 0.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    x = image.astype(np.float64)
    if blur:
        x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0))
    if noise:
        x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def calibration(samples: list[Sample], **kw: float) -> tuple[float, float]:
    """Object F1 (IoU >= 0.5 and right colour and shape) and mean IoU of those true positives."""
    tp, n_true, n_found, ious = 0, 0, 0, []
    for s in samples:
        truth, objs = _truth(s), parse_scene(degrade(s.image, **kw) if kw else s.image)
        rows, cols, iou = _match(truth, objs)
        for r, c, v in zip(rows, cols, iou):
            if v >= 0.5 and truth[r]["class_id"] == objs[c].class_id:
                tp += 1
                ious.append(v)
        n_true, n_found = n_true + len(truth), n_found + len(objs)
    return 2 * tp / (n_true + n_found), float(np.mean(ious)) if ious else 0.0


@pytest.fixture(scope="module")
def scenes() -> list[Sample]:
    world = ShapesWorld("eval", size=32, seed=0)
    return [world[i] for i in range(200)]


def test_calibration_quick(scenes: list[Sample]) -> None:
    f1, iou = calibration(scenes)
    assert f1 >= 0.99 and iou >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 64])
def test_calibration_1000_eval_renders(size: int) -> None:
    world = ShapesWorld("eval", size=size, seed=1)
    f1, iou = calibration([world[i] for i in range(1000)])
    assert f1 >= 0.99 and iou >= 0.95


def test_every_shape_at_both_sizes() -> None:
    for shape in SHAPES:
        for r in (3.3, 6.5):
            obj = {"shape": shape, "colour": "cyan", "r": r, "cx": 15.2, "cy": 16.7}
            image, seg = render_scene([obj], 32, background=(100, 104, 98))
            (found,) = parse_scene(image)
            assert (found.shape, found.colour) == (shape, "cyan")
            assert found.size == ("small" if r < 5 else "large")
            assert np.allclose(found.box, np.array([15.2 - r, 16.7 - r, 15.2 + r, 16.7 + r]) / 32, atol=0.3 / 32)
            assert np.array_equal(found.mask, seg > 0)


@pytest.mark.parametrize("kw", [{"blur": 0.5}, {"blur": 1.0}, {"noise": 5.0}, {"noise": 10.0}])
def test_mild_degradation_is_still_parsed(scenes: list[Sample], kw: dict) -> None:
    f1, iou = calibration(scenes[:100], **kw)
    assert f1 >= 0.97 and iou >= 0.9


def test_heavy_blur_degrades_gracefully(scenes: list[Sample]) -> None:
    # measured on these 100 scenes: F1 1.00, 0.92, 0.74, 0.27 at sigma 0, 1.5, 2, 3 (and box IoU falls too)
    results = [calibration(scenes[:100], blur=sigma) for sigma in (0.0, 1.5, 2.0, 3.0)]
    f1s = [f1 for f1, _ in results]
    assert f1s[0] >= 0.99 and f1s[-1] < 0.5, f1s
    assert all(later <= earlier + 0.03 for earlier, later in zip(f1s, f1s[1:])), f1s
    assert results[-1][1] < results[0][1] - 0.1, results  # the boxes it still finds are worse


def test_heavy_noise_degrades_gracefully(scenes: list[Sample]) -> None:
    f1s = [calibration(scenes[:40], noise=sigma)[0] for sigma in (0.0, 40.0, 80.0, 160.0)]
    assert f1s[0] >= 0.99 and f1s[-1] < 0.5
    assert all(later <= earlier + 0.03 for earlier, later in zip(f1s, f1s[1:])), f1s


def test_semantic_map_matches_segmentation(scenes: list[Sample]) -> None:
    acc = np.mean([(semantic_map(parse_scene(s.image), (32, 32)) == s.segmentation).mean() for s in scenes])
    assert acc >= 0.995


def test_clean_renders_are_clean_and_junk_is_not(scenes: list[Sample]) -> None:
    assert all(is_clean(parse_scene_details(s.image)) for s in scenes[:100])
    rng = np.random.default_rng(0)
    junk = [
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),  # uniform noise
        np.zeros((32, 32, 3), np.uint8),  # black
        np.full((32, 32, 3), 255, np.uint8),  # white
        np.full((32, 32, 3), 100, np.uint8),  # empty background: no object
    ]
    blot = scenes[0].image.copy()
    blot[2:6, 2:6] = (255, 255, 255)  # an off-palette blot next to a valid scene
    stripe = scenes[0].image.copy()
    stripe[:, 30:] = (220, 40, 40)  # a red stripe: an object no shape model explains
    for image in junk + [blot, stripe]:
        assert not is_clean(parse_scene_details(image))


def test_any_image_parses_without_error() -> None:
    rng = np.random.default_rng(1)
    for shape in [(32, 32, 3), (17, 40, 3), (64, 64, 3), (1, 1, 3)]:
        parse_scene(rng.integers(0, 256, shape, dtype=np.uint8))
    palette_full = np.full((32, 32, 3), (40, 70, 220), np.uint8)
    parse_scene(palette_full)  # a whole-image blue object: any answer, but no crash


def test_results_are_read_only(scenes: list[Sample]) -> None:
    (obj, *_) = parse_scene(scenes[0].image)
    with pytest.raises(ValueError):
        obj.mask[0, 0] = True


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        parse_scene(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        parse_scene(np.zeros((32, 32), np.uint8))
