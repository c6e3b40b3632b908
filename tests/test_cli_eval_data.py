"""`ldmkit eval` and `ldmkit data` as a user runs them: a fresh process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import load_dataset
from ldmkit.data.manifest import ManifestDataset
from ldmkit.evaluate import SUITES


def ldmkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def eval_json(*args: str) -> dict:
    proc = ldmkit("eval", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON object on stdout, nothing else
    return json.loads(lines[0])


# -- eval -------------------------------------------------------------------------------------------------


def test_eval_reference_follows_the_output_contract() -> None:
    out = eval_json("--suite", "shapes-class", "--reference", "--n", "20")
    assert set(out) == {"suite", "model", "n", "metrics"}
    assert out["suite"] == "shapes-class" and out["model"] is None and out["n"] == 20
    assert out["metrics"] == {"class_acc": 1.0}


def test_eval_shuffled_is_the_floor() -> None:
    out = eval_json("--suite", "shapes-class", "--shuffled", "--n", "20")
    assert out["model"] is None and out["n"] == 20
    assert out["metrics"]["class_acc"] < 0.5


def test_eval_unknown_suite_is_a_clean_error() -> None:
    proc = ldmkit("eval", "--suite", "shapes-foo", "--reference", "--json")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "shapes-foo" in proc.stderr and all(suite in proc.stderr for suite in SUITES), proc.stderr


def test_eval_recon_photos_reports_the_number_scored() -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    out = eval_json("--suite", "recon-photos", "--reference", "--n", "200")
    assert set(out) == {"suite", "model", "n", "metrics"} and out["model"] is None
    assert 2 <= out["n"] < 200  # capped at the held-out photo tiles (30), not the 200 asked for
    assert len(load_dataset("photos", split="eval")) == out["n"]
    assert set(out["metrics"]) == {"psnr", "ssim", "fd"}
    assert out["metrics"]["psnr"] == 100.0 and out["metrics"]["ssim"] == 1.0 and out["metrics"]["fd"] == 0.0


# -- data -------------------------------------------------------------------------------------------------


def test_data_preview_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "grid" / "shapes.png"
    proc = ldmkit("data", "preview", "shapes", "--n", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "8 samples" in proc.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 32 and image.height > 32
        image.load()


def test_data_export_loads_back_through_the_manifest_loader(tmp_path: Path) -> None:
    out = tmp_path / "export"
    proc = ldmkit("data", "export", "shapes", "--n", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    loaded = ManifestDataset(out / "manifest.jsonl")
    original = load_dataset("shapes", split="train", size=32, seed=0)
    assert len(loaded) == 5
    for i in range(5):
        a, b = loaded[i], original[i]
        assert np.array_equal(a.image, b.image)
        assert a.label == b.label and a.caption == b.caption
        assert np.array_equal(a.segmentation, b.segmentation) and np.array_equal(a.mask, b.mask)
        assert [box.label for box in a.boxes] == [box.label for box in b.boxes]
        assert np.allclose([box.bbox for box in a.boxes], [box.bbox for box in b.boxes])
    # the CLI reads the manifest back too
    proc = ldmkit("data", "preview", str(out / "manifest.jsonl"), "--out", str(tmp_path / "back.png"))
    assert proc.returncode == 0 and "5 samples" in proc.stdout, proc.stderr


def test_data_skip_invalid(tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert ldmkit("data", "export", "shapes", "--n", "3", "--out", str(out)).returncode == 0
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    assert len(lines) == 3
    lines.insert(1, json.dumps({"image": "images/00000.png", "label": -1}))  # line 2: a negative label
    manifest.write_text("\n".join(lines) + "\n")

    proc = ldmkit("data", "preview", str(manifest), "--out", str(tmp_path / "grid.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "manifest.jsonl:2:" in proc.stderr and "label" in proc.stderr, proc.stderr
    assert not (tmp_path / "grid.png").exists()

    proc = ldmkit("data", "preview", str(manifest), "--skip-invalid", "--out", str(tmp_path / "grid.png"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 invalid manifest line" in proc.stderr and "3 samples" in proc.stdout
    assert (tmp_path / "grid.png").is_file()
