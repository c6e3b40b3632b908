"""Atomic safetensors checkpoints: failure keeps the old file, damage is detected, state round-trips."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import ldmkit.train.checkpoint as ckpt_mod
from ldmkit.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    flatten_optimizer_state,
    load_checkpoint,
    make_metadata,
    module_tensors,
    read_metadata,
    restore_rng_state,
    save_checkpoint,
    write_atomic,
    unflatten_optimizer_state,
)


def _tensors(v: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), v), "b": torch.arange(3, dtype=torch.int64), "s": torch.tensor(v)}


def test_round_trip_and_metadata(tmp_path) -> None:
    meta = make_metadata("autoencoder", {"a": 1}, **{"ldmkit.step": 7})
    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), meta)
    ck = load_checkpoint(p)
    assert set(ck.tensors) == {"w", "b", "s"} and torch.equal(ck.tensors["w"], torch.ones(4, 4))
    assert ck.metadata["ldmkit.kind"] == "autoencoder" and ck.json("ldmkit.config") == {"a": 1}
    assert ck.metadata["ldmkit.step"] == "7" and "ldmkit.version" in ck.metadata
    assert read_metadata(p)["ldmkit.kind"] == "autoencoder"
    assert [f for f in os.listdir(tmp_path)] == ["c.safetensors"]  # no temp files left


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    p = tmp_path / "last.safetensors"
    save_checkpoint(p, _tensors(1.0), {"n": "1"})

    real_fsync = os.fsync

    def crash_after_partial_write(fd: int) -> None:  # the data is half on disk when we "crash"
        os.ftruncate(fd, 10)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.os, "fsync", crash_after_partial_write)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(p, _tensors(2.0), {"n": "2"})
    monkeypatch.setattr(ckpt_mod.os, "fsync", real_fsync)

    ck = load_checkpoint(p)
    assert ck.metadata["n"] == "1" and torch.equal(ck.tensors["w"], torch.ones(4, 4))
    assert os.listdir(tmp_path) == ["last.safetensors"], "the temporary file is cleaned up"


def test_write_atomic_text_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    """The same all-or-nothing write for any file (zoo cards, copied recipes): str is written as UTF-8."""
    p = write_atomic(tmp_path / "card.json", '{"a": "é"}\n')
    assert p.read_text(encoding="utf-8") == '{"a": "é"}\n'
    monkeypatch.setattr(ckpt_mod.os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        write_atomic(p, b"half")
    assert p.read_text(encoding="utf-8") == '{"a": "é"}\n' and os.listdir(tmp_path) == ["card.json"]


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    p = tmp_path / "last.safetensors"
    save_checkpoint(p, _tensors(1.0), {"n": "1"})

    def boom(*a, **k):
        raise KeyboardInterrupt  # interrupted right before the rename

    monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, _tensors(2.0), {"n": "2"})
    monkeypatch.undo()
    assert load_checkpoint(p).metadata["n"] == "1"
    assert os.listdir(tmp_path) == ["last.safetensors"]


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_files_raise_checkpoint_error(tmp_path, keep: int) -> None:
    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"k": "v"})
    data = p.read_bytes()
    p.write_bytes(data[:keep] if keep >= 0 else data[:-3])
    with pytest.raises(CheckpointError, match=r"c\.safetensors is truncated or corrupted"):
        load_checkpoint(p)


def test_corrupted_tensor_bytes_are_detected(tmp_path) -> None:
    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"k": "v"})
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted: contents do not match"):
        load_checkpoint(p)
    assert load_checkpoint(p, verify=False).tensors["w"].shape == (4, 4)


def test_corrupted_header_is_detected(tmp_path) -> None:
    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"k": "v"})
    data = bytearray(p.read_bytes())
    data[9] = ord("#")  # break the JSON header
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(p)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 2**40) + b"xx")
    with pytest.raises(CheckpointError, match="implausible"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_metadata_must_be_strings(tmp_path) -> None:
    with pytest.raises(TypeError, match="must be str"):
        save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"n": 1})  # type: ignore[dict-item]


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    import pickle
    import re

    src = Path(ckpt_mod.__file__).read_text()
    assert not re.search(r"(?<!safetensors\.)torch\.load\(", src) and "import pickle" not in src
    p = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {})

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    assert set(load_checkpoint(p).tensors) == {"w", "b", "s"}


def test_tied_weights_are_saved_separately(tmp_path) -> None:
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    m[1].weight = m[0].weight
    p = save_checkpoint(tmp_path / "t.safetensors", module_tensors(m, "m."), {})
    assert torch.equal(load_checkpoint(p).tensors["m.1.weight"], m[0].weight.detach())


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.5, 0.9)),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
])
def test_optimizer_and_rng_round_trip_is_exact(tmp_path, make_opt) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make_opt(model.parameters())
    _train(model, opt, 3)
    t_opt, m_opt = flatten_optimizer_state(opt.state_dict(), "opt")
    t_rng, m_rng = capture_rng_state()
    p = save_checkpoint(tmp_path / "s.safetensors", {**module_tensors(model, "model."), **t_opt, **t_rng},
                        {**m_opt, **m_rng})
    np_next, py_next = np.random.rand(), random.random()
    _train(model, opt, 2)
    expected = [t.clone() for t in model.parameters()]

    torch.manual_seed(123)  # scramble every RNG
    np.random.seed(123)
    random.seed(123)
    ck = load_checkpoint(p)
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(ck.subset("model."))
    opt2 = make_opt(model2.parameters())
    opt2.load_state_dict(unflatten_optimizer_state(ck.tensors, ck.metadata, "opt"))
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    restore_rng_state(ck.tensors, ck.metadata)
    assert np.random.rand() == np_next and random.random() == py_next
    _train(model2, opt2, 2)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)


def test_missing_optimizer_state_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="no optimizer state 'opt_d'"):
        unflatten_optimizer_state({}, {}, "opt_d")
    with pytest.raises(CheckpointError, match="no RNG state"):
        restore_rng_state({}, {})


def test_python_rng_state_is_json(tmp_path) -> None:
    _, meta = capture_rng_state()
    assert isinstance(json.loads(meta["rng.python"]), list)


def test_checkpoint_files_get_normal_permissions(tmp_path):
    import os

    import torch

    from ldmkit.train.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, {"k": "v"})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
