"""Hostile input (docs/reliability.md): every class of bad input gets a clear error naming the file or
field, nothing bad is accepted silently, resource requests that cannot fit are refused up front (or
batched), and a killed checkpoint write leaves nothing behind after a resume."""

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ldmkit
from ldmkit.cli import main
from ldmkit.config import ConfigError, load_config
from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder
from ldmkit.models.ldm import LatentDiffusion, save_ldm
from ldmkit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ldmkit.types import ConditionInputError

TINY_AE = dict(kind="kl", resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
               z_channels=3, embed_dim=3, norm_groups=4)
MODEL = {"image_size": 32, "latent_channels": 3, "downsample_factor": 4,
         "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "num_heads": 2},
         "conditioning": {"context_dim": 16, "conditioners": [{"type": "class", "num_classes": 18, "dim": 16}]}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny autoencoder, a tiny class-conditional model file, and a 2-step training run with a checkpoint."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    ae = save_autoencoder(Autoencoder(AutoencoderConfig(**TINY_AE)), root / "ae.safetensors")
    model = LatentDiffusion(load_config({**MODEL, "autoencoder": str(ae)}), Autoencoder(AutoencoderConfig(**TINY_AE)))
    path = save_ldm(model, root / "m.safetensors")
    recipe = {"model": {**MODEL, "autoencoder": str(ae)}, "data": {"name": "shapes", "cache_size": 16}, "steps": 2,
              "batch_size": 4, "warmup_steps": 1, "ckpt_every": 1, "log_every": 1, "image_every": 1000,
              "out_dir": str(root / "run"), "num_threads": 1}
    (root / "recipe.yaml").write_text(json.dumps(recipe))
    assert main(["train", str(root / "recipe.yaml"), "--quiet"]) == 0
    return {"root": root, "ae": ae, "model": path, "recipe": root / "recipe.yaml", "ckpt": root / "run/last.safetensors"}


def run(capsys, *argv):
    """``ldmkit ARGV`` in-process: (exit status, stderr). Never a traceback."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def rewrite(src, dst, change):
    """Copy a checkpoint with ``change(tensors, metadata)`` applied (a valid file: digest recomputed)."""
    ckpt = load_checkpoint(src)
    tensors, meta = dict(ckpt.tensors), dict(ckpt.metadata)
    change(tensors, meta)
    meta.pop("ldmkit.sha256", None)
    return save_checkpoint(dst, tensors, meta)


def raw_safetensors(path, header):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


# -- 1. errors name the file or field, never a traceback -----------------------------------------------------


@pytest.mark.parametrize("content,message", [
    (b"", "a model config must be a YAML mapping, got an empty file"),
    (b"- 1\n- 2\n", "a model config must be a YAML mapping, got list"),
    (bytes(range(128, 256)), "not a YAML text file (not UTF-8"),
])
def test_wiring_names_the_file_of_a_config_that_is_no_mapping(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    status, err = run(capsys, "wiring", bad)
    assert status == 2 and str(bad) in err and message in err


def test_build_stack_takes_a_mapping_or_a_path_and_names_anything_else(tmp_path):
    assert ldmkit.build_stack({"conditioning": {"conditioners": [{"type": "class"}]}}).names == ["class"]
    assert "class_vec" in ldmkit.build_stack("configs/ldm/compose-demo.yaml").names
    with pytest.raises(TypeError, match="expected a LatentDiffusionConfig, a mapping or a YAML path; got int"):
        ldmkit.build_stack(42)
    with pytest.raises(ConfigError, match="does not exist"):
        ldmkit.build_stack(tmp_path / "nope.yaml")


@pytest.mark.parametrize("header,message", [
    ([1, 2], "its header is a JSON list, not an object"),
    ({"__metadata__": "x"}, "its __metadata__ must map strings to strings, got str"),
    ({"__metadata__": {"ldmkit.kind": 3}}, "its __metadata__ must map strings to strings"),
])
def test_malformed_safetensors_headers_name_the_file(tmp_path, header, message):
    path = raw_safetensors(tmp_path / "odd.safetensors", header)
    with pytest.raises(CheckpointError, match=message) as info:
        ldmkit.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("change,message", [
    (lambda t, m: m.pop("ldmkit.config"), "has no 'ldmkit.config' metadata entry"),
    (lambda t, m: m.update({"ldmkit.config": "{not json"}), "metadata entry 'ldmkit.config' is not valid JSON"),
    (lambda t, m: m.update({"ldmkit.autoencoder_config": "[]"}), "holds an invalid autoencoder config"),
])
def test_a_model_file_with_missing_or_bad_config_names_the_file_and_entry(files, tmp_path, capsys, change, message):
    bad = rewrite(files["model"], tmp_path / "bad.safetensors", change)
    with pytest.raises(CheckpointError, match=message):
        ldmkit.load(bad)
    status, err = run(capsys, "sample", bad, "--n", "1", "--steps", "1", "--out", tmp_path / "s")
    assert status == 2 and str(bad) in err


def test_resuming_from_a_wrong_shaped_tensor_names_the_tensor(files, tmp_path, capsys):
    name = next(k for k in load_checkpoint(files["ckpt"]).tensors if k.startswith("model.unet.") and k.endswith("weight"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rewrite(files["ckpt"], run_dir / "last.safetensors", lambda t, m: t.update({name: torch.zeros(3, 3)}))
    status, err = run(capsys, "train", files["recipe"], "--out-dir", run_dir, "--resume", "--quiet")
    assert status == 2 and "weights do not match the model" in err
    assert name.removeprefix("model.unet.") in err and "has shape (3, 3)" in err


def test_output_paths_that_cannot_be_written_are_clear_errors(files, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("x")
    status, err = run(capsys, "sample", files["model"], "--n", "1", "--steps", "1", "--out", plain / "sub")
    assert status == 2 and "Not a directory" in err and "plain/sub" in err
    status, err = run(capsys, "sample", files["model"], "--n", "1", "--steps", "1", "--out", plain)
    assert status == 2 and "is a file; give a directory" in err
    status, err = run(capsys, "data", "preview", "shapes", "--n", "2", "--out", tmp_path)
    assert status == 2 and "must be an image file name" in err and "preview.png" in err
    status, err = run(capsys, "data", "preview", "shapes", "--n", "2", "--out", tmp_path / "noext")
    assert status == 2 and "--out" in err and ".png" in err


@pytest.mark.parametrize("argv,message", [
    (["--height", "-32"], "--height must be a positive number of pixels, got -32"),
    (["--height", "0"], "--height must be a positive number of pixels, got 0"),
    (["--width", "12"], "--width must be a multiple of 8 for this model, got 12"),
    (["--seed", str(2**64)], "--seed must be in 0..2**62-1"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
])
def test_bad_sampling_numbers_name_their_flag(files, tmp_path, capsys, argv, message):
    status, err = run(capsys, "sample", files["model"], "--n", "1", *argv, "--out", tmp_path / "s")
    assert status == 2 and message in err and not (tmp_path / "s").exists()


def test_python_sampling_refuses_bad_sizes_and_seeds(files):
    model = ldmkit.load(files["model"])
    for kw, message in (({"height": 0}, "height must be a positive multiple"), ({"width": -8}, "width must be"),
                        ({"seed": 2**63}, "seed must be an integer"), ({"seed": -1}, "seed must be")):
        with pytest.raises(ValueError, match=message):
            model.sample({"label": [1]}, steps=1, **kw)


def test_a_huge_condition_is_not_echoed_whole(files, tmp_path, capsys):
    big = tmp_path / "big.json"
    big.write_text(json.dumps(list(range(100_000))))
    status, err = run(capsys, "sample", files["model"], "--cond", f"label=@{big}", "--n", "1", "--out", tmp_path / "s")
    assert status == 2 and "condition 'label'" in err and "characters in all" in err and len(err) < 1000


def test_a_decompression_bomb_in_a_folder_is_refused_before_decoding(tmp_path):
    from ldmkit.data.manifest import FolderDataset, ManifestError

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("1", (8200, 8200)).save(folder / "bomb.png")  # 67 megapixels in a few kilobytes
    assert (folder / "bomb.png").stat().st_size < 100_000
    with pytest.raises(ManifestError, match=r"bomb.png: 8200x8200 is 67 megapixels, more than the 64 MP"):
        FolderDataset(folder)[0]


def test_a_closed_pipe_is_not_an_error():
    proc = subprocess.run(f"{sys.executable} -m ldmkit.cli zoo | head -1", shell=True, capture_output=True, text=True)
    assert proc.stdout.startswith("zoo:") and proc.stderr == ""


def test_an_unexpected_exception_is_one_line_with_the_traceback_on_request(monkeypatch, capsys):
    import ldmkit.cli as cli

    def boom(args):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(cli, "cmd_zoo", boom)
    status, err = run(capsys, "zoo")
    assert status == 3 and "internal error: RuntimeError: something nobody expected" in err and "LDMKIT_DEBUG=1" in err
    monkeypatch.setenv("LDMKIT_DEBUG", "1")
    assert main(["zoo"]) == 3 and "Traceback" in capsys.readouterr().err


# -- 2. nothing bad accepted silently -------------------------------------------------------------------------


@pytest.mark.parametrize("guidance,message", [
    (float("nan"), "guidance scales must be finite numbers; got guidance=nan"),
    ({"class": float("inf")}, "got class=inf"),
    ({"nope": 3.0}, "guidance names unknown conditioner(s) 'nope'; this model has: class"),
])
def test_bad_guidance_in_a_config_is_refused(guidance, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config({**MODEL, "guidance": guidance})


@pytest.mark.parametrize("argv,message", [
    (["--guidance", "nan"], "--guidance: expected a finite number, got 'nan'"),
    (["--guidance", "class=inf"], "--guidance class: expected a finite number"),
    (["--guidance", "nope=3"], "guidance names unknown conditioner(s) 'nope'"),
])
def test_export_refuses_bad_guidance(files, tmp_path, capsys, argv, message):
    status, err = run(capsys, "export", files["ckpt"], "--out", tmp_path / "m.safetensors", *argv)
    assert status == 2 and message in err and not (tmp_path / "m.safetensors").exists()


def test_export_refuses_to_write_over_its_own_checkpoint(files, capsys):
    before = files["ckpt"].read_bytes()
    status, err = run(capsys, "export", files["ckpt"], "--out", files["ckpt"])
    assert status == 2 and "is the checkpoint being exported" in err and files["ckpt"].read_bytes() == before


def test_train_steps_zero_is_an_error_not_the_recipes_steps(files, tmp_path, capsys):
    status, err = run(capsys, "train", files["recipe"], "--steps", "0", "--out-dir", tmp_path / "r", "--quiet")
    assert status == 2 and "steps" in err and "greater than 0" in err and not (tmp_path / "r").exists()


def test_infinite_scalar_bounds_are_refused():
    with pytest.raises(ConfigError, match="conditioners.0.high"):
        load_config({"conditioning": {"conditioners": [{"type": "scalar", "high": math.inf}]}})


def test_a_stack_refuses_keys_no_conditioner_reads():
    stack = ldmkit.build_stack("configs/ldm/compose-demo.yaml")
    with pytest.raises(ConditionInputError, match=r"condition 'lable': no conditioner of this model reads it; allowed: brightness, label"):
        stack({"label": [1], "brightness": [0.5], "lable": [2]})


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update({k: torch.full_like(t[k], float("nan")) for k in list(t)[:1]}), "contains NaN or inf"),
    (lambda t: t.update({k: t[k].to(torch.int32) for k in [next(k for k in t if k.endswith("weight"))]}), "is not floating point"),
])
def test_non_float_or_non_finite_weights_are_refused(files, tmp_path, change, message):
    bad = rewrite(files["model"], tmp_path / "bad.safetensors", lambda t, m: change(t))
    with pytest.raises(CheckpointError, match=message):
        ldmkit.load(bad)


@pytest.mark.parametrize("ref", ["zoo:/etc/passwd", "zoo:../zoo/shapes-class", "zoo:shapes-class/../shapes-class"])
def test_zoo_references_cannot_escape_the_zoo(ref):
    from ldmkit.zoo import ZooError, resolve

    with pytest.raises(ZooError, match="is not a zoo name"):
        resolve(ref)


def test_sample_does_not_overwrite_earlier_outputs_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert run(capsys, "sample", files["model"], "--n", "1", "--steps", "1", "--out", out)[0] == 0
    first = (out / "0000.png").read_bytes()
    status, err = run(capsys, "sample", files["model"], "--n", "1", "--steps", "1", "--seed", "5", "--out", out)
    assert status == 2 and "already holds earlier samples" in err and (out / "0000.png").read_bytes() == first
    assert run(capsys, "sample", files["model"], "--n", "1", "--steps", "1", "--seed", "5", "--out", out, "--overwrite")[0] == 0


@pytest.mark.parametrize("env,message", [
    ({"LDMKIT_DISABLE_PLUGINS": "nosuch"}, "LDMKIT_DISABLE_PLUGINS names 'nosuch', which is no installed plugin"),
    ({"LDMKIT_STRICT_PLUGINS": "maybe"}, "LDMKIT_STRICT_PLUGINS='maybe' is not a boolean"),
])
def test_misspelt_plugin_variables_are_warned_about(env, message):
    full = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-m", "ldmkit.cli", "plugins"], capture_output=True, text=True, env=full)
    assert proc.returncode == 0 and f"ldmkit: warning: {message}" in proc.stderr


# -- 3. resource limits ------------------------------------------------------------------------------------------


def test_a_sample_that_cannot_fit_is_refused_up_front_with_an_estimate(files, tmp_path, capsys):
    status, err = run(capsys, "sample", files["model"], "--n", "1", "--height", "4096", "--width", "4096", "--out", tmp_path / "s")
    assert status == 2 and "needs about" in err and "TiB" in err and "1,048,576 latent positions" in err


def test_a_huge_batch_is_refused_by_its_result_size_not_by_running_out_of_memory(files):
    model = ldmkit.load(files["model"])
    with pytest.raises(MemoryError, match=r"10,000,000 images of 32x32 need .* for the result alone"):
        model.sample(n=10_000_000, steps=1)


def test_many_images_are_sampled_in_batches_and_written_as_they_come(files, tmp_path, capsys):
    from ldmkit.cli import SAMPLE_CHUNK

    out = tmp_path / "many"
    status, _ = run(capsys, "sample", files["model"], "--n", SAMPLE_CHUNK + 3, "--steps", "1", "--out", out)
    assert status == 0 and len(list(out.glob("*.png"))) == SAMPLE_CHUNK + 3 + 1  # and grid.png
    last = json.loads((out / f"{SAMPLE_CHUNK + 2:04d}.json").read_text())
    assert last["batch_seed"] == 1000 and Image.open(out / "grid.png").size[1] < 10 * 8 * 32
    model = ldmkit.load(files["model"])  # the Python API batches too: chunk k is seed + 1000 k
    a = model.sample({"label": [3] * 3}, steps=1, seed=7)
    model.max_batch = 2
    b = model.sample({"label": [3] * 3}, steps=1, seed=7)
    assert torch.equal(a[:2], b[:2]) and b.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("argv,message", [
    (["--scale", "100000"], "scale must be an integer in 1..32"),
    (["--size", "100000"], "above the shapes world's limit of 2048 pixels"),
])
def test_preview_refuses_enormous_images(tmp_path, capsys, argv, message):
    status, err = run(capsys, "data", "preview", "shapes", "--n", "2", *argv, "--out", tmp_path / "p.png")
    assert status == 2 and message in err


# -- 4. temp files of a killed checkpoint write -------------------------------------------------------------------


def test_resume_removes_the_temp_files_a_killed_write_left(files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.safetensors").write_bytes(files["ckpt"].read_bytes())
    orphan = run_dir / ".last.safetensors.k1ll3d.tmp"
    orphan.write_bytes(b"half a checkpoint")
    (run_dir / "log.jsonl").write_text("")
    status, err = run(capsys, "train", files["recipe"], "--out-dir", run_dir, "--resume", "--steps", "3", "--quiet")
    assert status == 0, err
    assert not orphan.exists() and not list(run_dir.glob(".*.tmp"))
    assert any(json.loads(line).get("removed_temp_files") == 1 for line in (run_dir / "log.jsonl").read_text().splitlines())


def test_saving_a_checkpoint_sweeps_earlier_orphans(tmp_path):
    orphan = tmp_path / ".c.safetensors.abc.tmp"
    orphan.write_bytes(b"x")
    other = tmp_path / ".other.safetensors.abc.tmp"  # another file's temp: not ours to delete
    other.write_bytes(b"x")
    save_checkpoint(tmp_path / "c.safetensors", {"a": torch.zeros(1)}, {})
    assert not orphan.exists() and other.exists()
