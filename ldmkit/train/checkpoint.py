"""Atomic, pickle-free checkpoints in the safetensors format.

A checkpoint is one ``.safetensors`` file: a flat ``{name: tensor}`` dict plus string metadata.
Everything that is not a tensor (optimizer hyper-parameters, Python's RNG state, the config) is
JSON in the metadata. ``torch.load`` is never used, so opening a checkpoint never runs code.

- :func:`save_checkpoint` writes to a temporary file in the target's directory, fsyncs it and
  ``os.replace``-s it over the target, so a crash mid-write leaves the previous good file intact.
  It also stores a SHA-256 digest of every tensor and metadata entry under ``"ldmkit.sha256"``.
- :func:`load_checkpoint` checks the header, the sizes and the digest, and raises
  :class:`CheckpointError` ("checkpoint X is truncated or corrupted: ...") on any mismatch.
- :func:`flatten_optimizer_state` / :func:`unflatten_optimizer_state` and
  :func:`capture_rng_state` / :func:`restore_rng_state` turn an optimizer state_dict and the
  torch / numpy / Python RNG states into tensors + metadata and back.

Metadata keys written by ldmkit: ``"ldmkit.kind"`` (e.g. ``"autoencoder"``), ``"ldmkit.version"``,
``"ldmkit.config"`` (the validated config as JSON) -- see :func:`make_metadata`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel
from torch import Tensor

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "write_atomic",
    "load_checkpoint",
    "read_metadata",
    "make_metadata",
    "truncate_log",
    "module_tensors",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
    "capture_rng_state",
    "restore_rng_state",
    "load_module_state",
    "metadata_config",
    "remove_stale_temp_files",
    "DIGEST_KEY",
]

DIGEST_KEY = "ldmkit.sha256"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(RuntimeError):
    """A checkpoint file is missing pieces, truncated, corrupted or not what the caller expected."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str]

    def json(self, key: str) -> Any:
        """``json.loads(metadata[key])`` with a clear error when the key is missing."""
        if key not in self.metadata:
            raise CheckpointError(f"checkpoint {self.path} has no metadata entry {key!r}")
        return json.loads(self.metadata[key])

    def subset(self, prefix: str) -> dict[str, Tensor]:
        """Tensors whose name starts with ``prefix``, with the prefix removed (a module state_dict)."""
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def ldmkit_version() -> str:
    """The installed ldmkit version (``0+unknown`` when running from a source tree without metadata)."""
    try:
        from ldmkit import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        return version("ldmkit")
    except Exception:
        return "0+unknown"


def make_metadata(kind: str, config: BaseModel | dict[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """Standard metadata: ``ldmkit.kind``, ``ldmkit.version``, ``ldmkit.config`` (JSON) and ``extra``.

    Non-string ``extra`` values are JSON-encoded.
    """
    meta = {"ldmkit.kind": kind, "ldmkit.version": ldmkit_version()}
    if config is not None:
        meta["ldmkit.config"] = (
            config.model_dump_json() if isinstance(config, BaseModel) else json.dumps(config, sort_keys=True)
        )
    for k, v in extra.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def module_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """A module's state_dict as contiguous, unshared tensors named ``prefix + key`` (ready to save)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in module.state_dict().items():
        t = v.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(key)
        out[prefix + k] = t
    return out


# ---------------------------------------------------------------------------------------------------
# Digest


def _digest(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for k in sorted(metadata):
        if k != DIGEST_KEY:
            h.update(f"{k}={metadata[k]}\x00".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Save / load


def save_checkpoint(path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write ``tensors`` + ``metadata`` to ``path`` (safetensors); returns the path.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then
    ``os.replace``-d over ``path`` (and the directory fsynced). If anything fails before the
    replace, ``path`` still holds the previous checkpoint and the temporary file is removed.
    """
    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"checkpoint metadata keys and values must be str; not for {bad}")
    bad_t = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad_t:
        raise TypeError(f"checkpoint tensors must be torch.Tensor; not for {bad_t}")
    meta = dict(metadata)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta[DIGEST_KEY] = _digest(tensors, meta)
    return write_atomic(path, safetensors.torch.save(tensors, metadata=meta))


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` so that a reader sees the old file or the new, never a part.

    The bytes go to a temporary file in the same directory, flushed and fsynced, then ``os.replace``-d
    over ``path`` and the directory fsynced; on any failure before the replace ``path`` is untouched and
    the temporary file removed. Checkpoints, exports, zoo cards and galleries are written this way.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        remove_stale_temp_files(path)  # leftovers of an earlier writer that was killed mid-write
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is truncated or corrupted: {why}")

    if len(data) < 8:
        raise fail(f"only {len(data)} bytes, shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER:
        raise fail(f"header length {n} is implausible (not a safetensors file?)")
    if 8 + n > len(data):
        raise fail(f"header claims {n} bytes but the file has {len(data) - 8} after the length field")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    _check_metadata(path, header)
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise fail("a tensor entry in the header has no valid data_offsets") from None
    payload = len(data) - 8 - n
    expected = max(ends, default=0)
    if expected > payload:
        raise fail(f"tensor data needs {expected} bytes but only {payload} are present")
    if expected < payload:
        raise fail(f"{payload - expected} unexpected trailing bytes after the tensor data")
    return header


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Only the metadata of a checkpoint (no tensor is read); CheckpointError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted: only {len(head)} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted: header length {n} is implausible")
        body = fh.read(n)
    if len(body) < n:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: header cut short")
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} is not a safetensors file: its header is a JSON "
                              f"{type(header).__name__}, not an object")
    _check_metadata(path, header)
    return dict(header.get("__metadata__") or {})


def _check_metadata(path: Path, header: dict[str, Any]) -> None:
    meta = header.get("__metadata__")
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"checkpoint {path} is corrupted: its __metadata__ must map strings to strings, "
                              f"got {type(meta).__name__}")


def metadata_config(path: str | os.PathLike[str], metadata: dict[str, str], key: str = "ldmkit.config") -> Any:
    """``json.loads(metadata[key])``, or a :class:`CheckpointError` naming the file and the entry."""
    if key not in metadata:
        raise CheckpointError(f"{path} has no {key!r} metadata entry (not written by ldmkit, or damaged)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata entry {key!r} is not valid JSON ({e})") from None


def load_module_state(module: torch.nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """``module.load_state_dict(tensors, strict=True)`` with every mismatch named, and nothing silently
    converted: missing or unexpected tensors, wrong shapes, a non-float tensor where the module holds a
    float one, NaN or inf values — each a :class:`CheckpointError` naming ``where`` and the tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    for name in sorted(set(own) & set(tensors)):
        want, got = own[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"{name} has shape {tuple(got.shape)}, the model's is {tuple(want.shape)}")
        elif want.is_floating_point() and not got.is_floating_point():
            problems.append(f"{name} is {got.dtype}, the model holds floating-point weights there")
        elif got.is_floating_point() and got.numel() and not bool(torch.isfinite(got).all()):
            problems.append(f"{name} contains NaN or inf")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{where}: weights do not match the model: {shown}")
    module.load_state_dict(tensors, strict=True)


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the hidden temporary files a killed :func:`save_checkpoint` of ``path`` left behind
    (``.NAME.*.tmp`` beside it); returns what was removed. Called on every save and on resume."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def load_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Read a safetensors checkpoint (never unpickles).

    Raises ``FileNotFoundError`` when the file is missing and :class:`CheckpointError` when it is
    truncated, corrupted, or (with ``verify``) its tensors/metadata do not match the stored digest.
    Files written by other tools (no digest) load without the digest check.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    header = _parse_header(path, data)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # SafetensorError and friends
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {e}") from None
    metadata = dict(header.get("__metadata__") or {})
    if verify and DIGEST_KEY in metadata and _digest(tensors, metadata) != metadata[DIGEST_KEY]:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted: contents do not match the stored SHA-256 digest"
        )
    return Checkpoint(path=path, tensors=tensors, metadata=metadata)


# ---------------------------------------------------------------------------------------------------
# Optimizer state


def _to_json(obj: Any) -> Any:
    """JSON-able copy that remembers tuples (Adam's ``betas``) so they round-trip exactly."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def flatten_optimizer_state(state_dict: dict[str, Any], prefix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``optimizer.state_dict()`` -> tensors ``{prefix}.state.{param}.{key}`` + metadata JSON.

    Tensor entries of the per-parameter state become tensors; everything else (``param_groups``,
    non-tensor state such as Python floats) goes to the metadata entry ``{prefix}.json``.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{prefix}.state.{pid}.{key}"] = val.detach().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    meta = {
        "param_groups": state_dict["param_groups"],
        "scalars": scalars,
        "state_ids": [str(p) for p in state_dict["state"]],
    }
    return tensors, {f"{prefix}.json": json.dumps(_to_json(meta))}


def unflatten_optimizer_state(
    tensors: dict[str, Tensor], metadata: dict[str, str], prefix: str
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`: a dict for ``optimizer.load_state_dict``."""
    key = f"{prefix}.json"
    if key not in metadata:
        raise CheckpointError(f"checkpoint has no optimizer state {prefix!r} (metadata {key!r} missing)")
    meta = _from_json(json.loads(metadata[key]))
    state: dict[int, dict[str, Any]] = {int(p): {} for p in meta["state_ids"]}
    head = f"{prefix}.state."
    for name, t in tensors.items():
        if name.startswith(head):
            pid, k = name[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[k] = t
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state(prefix: str = "rng") -> tuple[dict[str, Tensor], dict[str, str]]:
    """torch (CPU and CUDA) RNG states as uint8 tensors; numpy's and Python's as JSON metadata."""
    tensors = {f"{prefix}.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    version, internal, gauss_next = random.getstate()
    py_state = [version, list(internal), gauss_next]
    return tensors, {f"{prefix}.numpy": json.dumps(np_state), f"{prefix}.python": json.dumps(py_state)}


def restore_rng_state(tensors: dict[str, Tensor], metadata: dict[str, str], prefix: str = "rng") -> None:
    """Restore what :func:`capture_rng_state` saved (CUDA states only when CUDA is present)."""
    if f"{prefix}.torch" not in tensors:
        raise CheckpointError(f"checkpoint has no RNG state (tensor {prefix + '.torch'!r} missing)")
    torch.set_rng_state(tensors[f"{prefix}.torch"])
    cuda_keys = [k for k in tensors if k.startswith(f"{prefix}.cuda.")]
    cuda = [tensors[k] for k in sorted(cuda_keys, key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = json.loads(metadata[f"{prefix}.numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = json.loads(metadata[f"{prefix}.python"])
    random.setstate((version, tuple(internal), gauss_next))


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if rec.get("step", 0) <= step and rec.get("event") != "done":
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
