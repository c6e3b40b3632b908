"""The suite runner: ceilings (reference), floors (shuffled), model mode, argument checks."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from scipy import ndimage

from ldmkit.data.base import Sample
from ldmkit.evaluate import MODES, SUITES, derangement, main, run_suite, suite_conditions, suite_size

SHAPES_SUITES = [s for s in SUITES if s not in ("recon-photos", "emoji-text")]  # emoji-text: its own test below
N = 200


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], dict[str, float]]:
    return {(suite, mode): run_suite(suite, n=N, mode=mode) for suite in SHAPES_SUITES for mode in MODES[:2]}


# the required ceilings and floors (issue 3), plus the rest of docs/evaluation.md's tables, loosely
CEILING = {
    "shapes-class": {"class_acc": 0.99},
    "shapes-caption": {"caption_acc": 0.99, "caption_acc_heldout": 0.99},
    "shapes-layout": {"miou": 0.95, "count_acc": 0.99, "label_acc": 0.99},
    "shapes-semantic": {"pixel_acc": 0.99, "miou": 0.95, "object_f1": 0.99},
    "shapes-sr": {"psnr": 100.0, "ssim": 1.0, "lr_psnr": 100.0},
    "shapes-inpaint": {"psnr_outside": 100.0, "psnr_inside": 100.0, "object_f1": 0.99, "object_f1_all": 0.99},
    "shapes-uncond": {"valid_scene_rate": 0.99},
    "recon-shapes": {"psnr": 100.0, "ssim": 1.0},
}
FLOOR = {
    "shapes-class": {"class_acc": 0.2},
    "shapes-caption": {"caption_acc": 0.2, "caption_acc_heldout": 0.2},
    "shapes-layout": {"miou": 0.3, "count_acc": 0.5, "label_acc": 0.5},
    "shapes-semantic": {"pixel_acc": 0.85, "miou": 0.2, "object_f1": 0.2},
    "shapes-sr": {"psnr": 20.0, "ssim": 0.5, "lr_psnr": 20.0},
    "shapes-inpaint": {"psnr_outside": 20.0, "psnr_inside": 20.0, "object_f1": 0.2, "object_f1_all": 0.2},
    "recon-shapes": {"psnr": 20.0, "ssim": 0.5},
}


@pytest.mark.parametrize("suite", SHAPES_SUITES)
def test_reference_reaches_the_ceiling(results: dict, suite: str) -> None:
    got = results[suite, "reference"]
    assert all(isinstance(v, float) for v in got.values())
    for name, low in CEILING[suite].items():
        assert got[name] >= low, (name, got)


@pytest.mark.parametrize("suite", [s for s in SHAPES_SUITES if s in FLOOR])
def test_shuffled_stays_at_the_floor(results: dict, suite: str) -> None:
    got = results[suite, "shuffled"]
    for name, high in FLOOR[suite].items():
        assert got[name] <= high, (name, got)


def test_condition_only_metrics_ignore_the_images(results: dict) -> None:
    ref, shuf = results["shapes-sr", "reference"], results["shapes-sr", "shuffled"]
    assert ref["psnr_bicubic"] == shuf["psnr_bicubic"] and 20 < ref["psnr_bicubic"] < 40


def test_distribution_metrics_cannot_tell_shuffled_from_reference(results: dict) -> None:
    ref, shuf = results["shapes-uncond", "reference"], results["shapes-uncond", "shuffled"]
    assert shuf["valid_scene_rate"] == ref["valid_scene_rate"]
    assert shuf["fd"] == pytest.approx(ref["fd"])  # the same image set in another order
    assert results["recon-shapes", "reference"]["fd"] == pytest.approx(ref["fd"])


def test_model_mode_scores_what_generate_returns() -> None:
    seen: list[list[Sample]] = []

    def identity(conditions: list[Sample]) -> list[np.ndarray]:
        seen.append(conditions)
        return [c.image for c in conditions]

    got = run_suite("shapes-layout", n=20, mode="model", generate=identity)
    assert got == run_suite("shapes-layout", n=20, mode="reference")
    assert len(seen) == 1 and len(seen[0]) == 20

    def blank(conditions: list[Sample]) -> list[np.ndarray]:
        return [np.full_like(c.image, 100) for c in conditions]

    assert run_suite("shapes-class", n=20, mode="model", generate=blank) == {"class_acc": 0.0}
    # caption suite: n eval + n held-out conditions in one call
    assert len(suite_conditions("shapes-caption", 5)) == 10


def test_generate_output_is_checked() -> None:
    with pytest.raises(ValueError, match="returned 19 images for 20"):
        run_suite("shapes-class", n=20, mode="model", generate=lambda c: [x.image for x in c][:19])
    with pytest.raises(ValueError, match="uint8"):
        run_suite("shapes-class", n=20, mode="model", generate=lambda c: [x.image.astype(float) for x in c])


@pytest.mark.parametrize("kwargs, word", [
    ({"suite": "shapes-foo"}, "shapes-class, shapes-caption"), ({"mode": "oracle"}, "mode"), ({"n": 1}, "n must"),
    ({"mode": "model"}, "generate"), ({"generate": lambda c: c}, "generate"), ({"size": 30}, "size"),
])
def test_bad_arguments(kwargs: dict, word: str) -> None:
    kwargs = {"suite": "shapes-class", "n": 10, **kwargs}
    with pytest.raises(ValueError, match=word):
        run_suite(kwargs.pop("suite"), **kwargs)


def test_derangement() -> None:
    for n in (2, 3, 10, 200):
        perm = derangement(n, seed=0)
        assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()
    assert (derangement(50, 1) == derangement(50, 1)).all()


def test_conditions_are_deterministic_and_seeded() -> None:
    a, b = suite_conditions("shapes-class", 5, seed=0), suite_conditions("shapes-class", 5, seed=0)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    c = suite_conditions("shapes-class", 5, seed=1)
    assert not np.array_equal(a[0].image, c[0].image)


def test_recon_photos_without_the_photos_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ldmkit.data.photos", None)  # makes the import fail
    with pytest.raises(NotImplementedError, match="ldmkit.data.photos"):
        run_suite("recon-photos", n=4)


def test_recon_photos_when_available() -> None:
    pytest.importorskip("ldmkit.data.photos")
    ref = run_suite("recon-photos", n=8, mode="reference")
    shuf = run_suite("recon-photos", n=8, mode="shuffled")
    assert ref == {"psnr": 100.0, "ssim": 1.0, "fd": 0.0}  # fd's reference: the same photos' originals
    assert shuf["psnr"] < 25 and shuf["ssim"] < 0.6
    assert shuf["fd"] == pytest.approx(0.0, abs=1e-6)  # a distribution metric: the same set reordered
    blurred = run_suite("recon-photos", n=200, mode="model",
                        generate=lambda conds: [ndimage.gaussian_filter(c.image, (1.5, 1.5, 0)) for c in conds])
    assert blurred["fd"] > 10


def test_suite_size() -> None:
    assert suite_size("shapes-class", 20) == 20 and suite_size("shapes-caption", 5) == 5
    with pytest.raises(ValueError, match="allowed suites"):
        suite_size("shapes-foo", 5)
    pytest.importorskip("ldmkit.data.photos")
    tiles = suite_size("recon-photos", 10_000)
    assert 2 <= tiles < 200 and len(suite_conditions("recon-photos", 10_000)) == tiles
    assert suite_size("recon-photos", 8) == 8


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shapes-class", "--n", "10", "--shuffled"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"suite", "model", "n", "metrics"}  # the same contract as `ldmkit eval --json`
    assert out["suite"] == "shapes-class" and out["model"] is None and out["n"] == 10
    assert 0 <= out["metrics"]["class_acc"] <= 1


def test_emoji_retrieval_is_calibrated_on_near_misses_and_probes_that_should_fail():
    """emoji-text: the ground truth retrieves itself, near misses nearly so, another emoji never, and a
    disc of the right colour (colour right, shape wrong) only a little."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from ldmkit.evaluate import run_suite, suite_conditions
    from ldmkit.metrics.emoji import retrieval_scores

    truth = [c.image for c in suite_conditions("emoji-text", 200)]
    assert len(truth) == 134
    assert run_suite("emoji-text", n=200, mode="reference")["retrieval_top1"] == 1.0
    shuffled = run_suite("emoji-text", n=200, mode="shuffled")
    assert shuffled["retrieval_top1"] == 0.0 and shuffled["retrieval_top5"] < 0.05
    shifted = [np.roll(t, (2, 2), axis=(0, 1)) for t in truth]
    blurred = [np.clip(gaussian_filter(t.astype(float), (1, 1, 0)), 0, 255).astype(np.uint8) for t in truth]
    assert retrieval_scores(shifted, truth)["retrieval_top1"] >= 0.9
    assert retrieval_scores(blurred, truth)["retrieval_top1"] >= 0.9
    yy, xx = np.mgrid[:32, :32]
    discs = []
    for t in truth:
        ink = t.reshape(-1, 3)[~(t.reshape(-1, 3) > 240).all(axis=1)]
        disc = np.full((32, 32, 3), 255, np.uint8)
        disc[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = ink.mean(axis=0)
        discs.append(disc)
    colour_only = retrieval_scores(discs, truth)
    assert 0.05 < colour_only["retrieval_top1"] < 0.3  # colour alone is worth something, and is far from the truth


def _redraw(s: Sample, swap_small: dict[str, str]) -> np.ndarray:
    """The scene re-drawn from its objects' boxes and colours, small objects' shapes replaced per ``swap_small``."""
    from ldmkit.data.shapes import render_scene

    size = s.image.shape[0]
    objects = []
    for o in s.meta["objects"]:
        x0, y0, x1, y1 = (v * size for v in o["box"])
        shape = swap_small.get(o["shape"], o["shape"]) if o["size"] == "small" else o["shape"]
        objects.append({"shape": shape, "colour": o["colour"], "r": (x1 - x0) / 2, "cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2})
    return render_scene(objects, size, s.meta["background"])[0]


def test_semantic_suite_catches_small_shapes_drawn_as_the_wrong_shape() -> None:
    """Probe: every small square drawn as a circle and every small circle as a square, in place. Most
    pixels still match the map, so pixel_acc alone passes it (above the issue's 0.93); miou and
    object_f1 must not."""
    faithful = run_suite("shapes-semantic", n=N, mode="model", generate=lambda c: [_redraw(x, {}) for x in c])
    swapped = run_suite("shapes-semantic", n=N, mode="model",
                        generate=lambda c: [_redraw(x, {"square": "circle", "circle": "square"}) for x in c])
    assert faithful["object_f1"] >= 0.99 and faithful["pixel_acc"] >= 0.99  # the probe's drawing is faithful
    assert swapped["pixel_acc"] >= 0.93, swapped  # the pixel score is fooled ...
    assert swapped["miou"] <= 0.8 and swapped["object_f1"] <= 0.75, swapped  # ... the class-aware scores are not


def test_sr_target_is_not_met_by_interpolation() -> None:
    """Probes for the +3 dB target (psnr - psnr_bicubic): bicubic itself, bicubic sharpened by an unsharp
    mask, and nearest-neighbour blocks all gain nothing over bicubic; only detail the low-res image does
    not hold can. Blocks reproduce the low-res input exactly (lr_psnr 100) and still lose PSNR."""
    from PIL import Image, ImageFilter

    from ldmkit.metrics.image import bicubic_upsample

    def bicubic(c: Sample) -> np.ndarray:
        return bicubic_upsample(c.lowres, c.image.shape[:2])

    probes = {
        "bicubic": bicubic,
        "unsharp": lambda c: np.asarray(Image.fromarray(bicubic(c)).filter(ImageFilter.UnsharpMask(2, 150, 0))),
        "nearest": lambda c: np.repeat(np.repeat(c.lowres, 4, 0), 4, 1),
    }
    for name, up in probes.items():
        got = run_suite("shapes-sr", n=N, mode="model", generate=lambda cs: [up(c) for c in cs])
        assert got["psnr"] - got["psnr_bicubic"] <= 0.01, (name, got)
    assert got["lr_psnr"] == 100.0  # the blocks area-average back to the input exactly


def _inpaint_probe(kind: str):
    """Images for the inpainting suite's conditions: no completion (the hole filled with the background), the
    scene with every mostly hidden object left out, or partly hidden but recoverable objects recoloured."""
    from ldmkit.data.shapes import render_scene
    from ldmkit.metrics.shapes import _visible_fractions

    swap = dict(zip(["red", "green", "blue", "yellow", "magenta", "cyan"], ["green", "blue", "red", "magenta", "cyan", "yellow"]))

    def make(c: Sample) -> np.ndarray:
        if kind == "grey":
            img = c.image.copy()
            img[c.mask] = np.clip(np.array(c.meta["background"]), 0, 255).astype(np.uint8)
            return img
        size, objects = c.image.shape[0], []
        for o, visible in zip(c.meta["objects"], _visible_fractions(c, c.mask)):
            if kind == "no_hidden" and visible < 0.5:
                continue
            colour = swap[o["colour"]] if kind == "recolour" and 0.5 <= visible < 1 else o["colour"]
            x0, y0, x1, y1 = (v * size for v in o["box"])
            objects.append({"shape": o["shape"], "colour": colour, "r": (x1 - x0) / 2, "cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2})
        return render_scene(objects, size, c.meta["background"])[0]

    return lambda conds: [make(c) for c in conds]


def test_inpaint_object_score_asks_only_for_what_the_visible_part_determines() -> None:
    """Probes for shapes-inpaint's object_f1: leaving out objects the hole hides is free (the all-objects
    score would call it 0.65); not completing partly hidden objects (a grey fill) scores well below the
    0.90 target (their cut-off remains are not recognisable shapes: 0.48; 0.70 before objects had to be
    recognisable); completing them in the wrong colour scores low too."""
    got = {k: run_suite("shapes-inpaint", n=N, mode="model", generate=_inpaint_probe(k)) for k in ("grey", "no_hidden", "recolour")}
    assert got["no_hidden"]["object_f1"] >= 0.99 and got["no_hidden"]["object_f1_all"] < 0.75
    assert 0.3 < got["grey"]["object_f1"] < 0.6 and got["grey"]["psnr_outside"] == 100.0
    assert got["recolour"]["object_f1"] < 0.5
