"""The first-stage trainer: it learns, writes its outputs, and resumes bit-exactly after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ldmkit.train.autoencoder import (
    AugmentConfig,
    AutoencoderTrainConfig,
    augment_images,
    batch_indices,
    load_autoencoder,
    load_train_config,
    train_autoencoder,
)
from ldmkit.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(out_dir: Path, kind: str = "kl", **kw) -> AutoencoderTrainConfig:
    raw = dict(
        model=dict(kind=kind, ch=8, ch_mult=[1, 2], norm_groups=4, resolution=16, z_channels=3, embed_dim=3,
                   n_embed=16 if kind == "vq" else None),
        data=dict(name="shapes", size=16, seed=0, options={"length": 64}),
        discriminator=dict(ndf=8, n_layers=2),
        steps=6, batch_size=4, lr=2e-3, disc_start=2, ema=0.9, seed=3,
        log_every=1, image_every=3, ckpt_every=2, num_images=4, scale_batches=2, out_dir=str(out_dir),
        num_threads=1,  # tiny models run fastest on one thread, especially on a busy machine
    )
    raw.update(kw)
    return AutoencoderTrainConfig.model_validate(raw)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_batch_indices_are_a_pure_function_of_seed_and_step() -> None:
    n, b = 10, 4
    seq = np.concatenate([batch_indices(s, b, n, seed=1) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert np.array_equal(batch_indices(3, b, n, seed=1), seq[12:16])
    assert not np.array_equal(batch_indices(0, b, n, seed=2), batch_indices(0, b, n, seed=1))


def test_augmentation_is_a_pure_function_of_seed_and_step() -> None:
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    cfg = AugmentConfig(hflip=True, channel_permute=True)
    a = augment_images(images, cfg, seed=1, step=5)
    assert np.array_equal(a, augment_images(images, cfg, seed=1, step=5))
    assert not np.array_equal(a, augment_images(images, cfg, seed=1, step=6))
    assert np.array_equal(np.sort(a.reshape(-1)), np.sort(images.reshape(-1)))  # same values, moved
    assert augment_images(images, AugmentConfig(), 1, 5) is images


def test_training_writes_outputs_and_loss_drops(tmp_path) -> None:
    cfg = tiny_cfg(tmp_path / "run", steps=40, disc_start=30, log_every=10, image_every=20, ckpt_every=20)
    path = train_autoencoder(cfg, progress=False)
    assert path == tmp_path / "run" / "model.safetensors"
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "event" not in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    assert steps[-1]["l1"] < 0.75 * steps[0]["l1"], steps
    assert "d_loss" in steps[-1] and "d_loss" not in steps[1]  # the discriminator switches on at 30
    assert logs[0]["event"] == "start" and logs[-1]["event"] == "done" and logs[-1]["scale_factor"] > 0
    with Image.open(tmp_path / "run" / "samples" / "step_000020.png") as grid:
        assert grid.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)
    ae = load_autoencoder(path)
    assert float(ae.scale_factor) == pytest.approx(logs[-1]["scale_factor"])
    with pytest.raises(FileExistsError, match="resume=True"):
        train_autoencoder(cfg, progress=False)


def test_vq_training_tracks_usage(tmp_path) -> None:
    cfg = tiny_cfg(tmp_path / "vq", kind="vq", steps=4, ema=None, save_dtype="float16")
    path = train_autoencoder(cfg, progress=False)
    rec = [json.loads(line) for line in (tmp_path / "vq" / "log.jsonl").read_text().splitlines()]
    assert {"perplexity", "usage", "codebook", "restarted"} <= set(rec[-2])
    assert load_checkpoint(path).tensors["decoder.conv_out.weight"].dtype == torch.float16
    assert load_autoencoder(path).decoder.conv_out.weight.dtype == torch.float32


def _tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(path).tensors.items() if k.startswith(prefixes)}


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    prefixes = ("model.", "disc.", "ema.", "opt_", "rng.")
    a, b = _tensors(a_dir / "last.safetensors", prefixes), _tensors(b_dir / "last.safetensors", prefixes)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    fa, fb = load_checkpoint(a_dir / "model.safetensors"), load_checkpoint(b_dir / "model.safetensors")
    assert fa.tensors.keys() == fb.tensors.keys()
    assert all(torch.equal(fa.tensors[k], fb.tensors[k]) for k in fa.tensors)
    logged = [json.loads(x) for x in (b_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "event" not in r] == [1, 2, 3, 4, 5, 6], \
        "lines logged after the checkpoint by the interrupted run are dropped"


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path) -> None:
    """A subprocess is SIGKILLed one step after its step-4 checkpoint; resuming it to step 6 matches
    an uninterrupted 6-step run exactly (weights, discriminator, EMA, optimizers, RNG, final file)."""
    full = tiny_cfg(tmp_path / "full")
    train_autoencoder(full, progress=False)

    part = tiny_cfg(tmp_path / "part")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(part.model_dump_json())
    script = (
        "import os, pathlib, signal, sys\n"
        "from ldmkit.train.autoencoder import AutoencoderTrainConfig, train_autoencoder\n"
        "cfg = AutoencoderTrainConfig.model_validate_json(pathlib.Path(sys.argv[1]).read_text())\n"
        "def die(step, logs):\n"
        "    if step == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_autoencoder(cfg, progress=False, on_step=die)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(cfg_file)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "part" / "last.safetensors").metadata["ldmkit.step"] == "4"
    assert not (tmp_path / "part" / "model.safetensors").exists()

    train_autoencoder(part, resume=True, progress=False)
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def test_resume_after_crash_is_bit_identical_vq(tmp_path) -> None:
    """Same for VQ (codebook restarts use the RNG too), interrupted in-process by an exception at step 5."""
    aug = {"hflip": True, "channel_permute": True}  # augmentation draws from (seed, step) too
    train_autoencoder(tiny_cfg(tmp_path / "full", kind="vq", augment=aug), progress=False)

    def crash(step: int, logs: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt

    part = tiny_cfg(tmp_path / "part", kind="vq", augment=aug)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(part, progress=False, on_step=crash)
    torch.manual_seed(999)  # whatever happened to the RNG in between must not matter
    train_autoencoder(part, resume=True, progress=False)
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def test_resume_refuses_a_changed_recipe(tmp_path) -> None:
    cfg = tiny_cfg(tmp_path / "r", steps=2)
    train_autoencoder(cfg, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train_autoencoder(tiny_cfg(tmp_path / "r", steps=4, lr=1e-4), resume=True, progress=False)
    train_autoencoder(tiny_cfg(tmp_path / "r", steps=3), resume=True, progress=False)  # more steps is fine
    assert load_checkpoint(tmp_path / "r" / "last.safetensors").metadata["ldmkit.step"] == "3"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_autoencoder(tiny_cfg(tmp_path / "none"), resume=True, progress=False)


def test_config_errors_name_the_fields(tmp_path) -> None:
    with pytest.raises(ValidationError, match=r"data.size=17 is not divisible .* f=2"):
        tiny_cfg(tmp_path, data=dict(name="shapes", size=17))
    with pytest.raises(ValidationError, match="perceptual_weights"):
        tiny_cfg(tmp_path, perceptual_weight=1.0)
    with pytest.raises(ValidationError, match="extra"):
        tiny_cfg(tmp_path, stepz=3)


@pytest.mark.parametrize("name", ["shapes-kl-f4", "shapes-vq-f4", "photos-kl-f4"])
def test_shipped_recipes_validate(name: str) -> None:
    cfg = load_train_config(ROOT / "configs" / "autoencoder" / f"{name}.yaml")
    assert cfg.model.downsample_factor == 4 and cfg.data.size == 32
    assert cfg.perceptual_weight == 0  # the default recipes never need downloaded weights


def test_perceptual_loss_needs_a_local_file(tmp_path) -> None:
    from ldmkit.train.losses import PerceptualLoss

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        PerceptualLoss(tmp_path / "vgg16.safetensors")


def test_adaptive_weight_formula() -> None:
    from ldmkit.train.losses import adaptive_weight, hinge_d_loss

    w = torch.nn.Parameter(torch.ones(3))
    rec = (2 * w).sum()  # grad norm 2*sqrt(3)
    g = (w * 0.5).sum()  # grad norm 0.5*sqrt(3)
    lam = adaptive_weight(rec, g, w, disc_weight=0.5)
    assert lam.item() == pytest.approx(0.5 * (2 * 3**0.5) / (0.5 * 3**0.5 + 1e-4), rel=1e-6)
    zero = adaptive_weight(rec, (w * 0).sum(), w)
    assert zero.item() == 1e4  # clamped
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
