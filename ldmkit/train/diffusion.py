"""Training a latent diffusion model: ``ldmkit train CONFIG.yaml`` with a ``model:`` of kind latent_diffusion.

- the first stage is loaded frozen from ``model.autoencoder`` (a path or ``zoo:NAME``);
- latents can be cached (the training images encoded once) — the first stage is frozen, so this only
  drops the KL posterior's sampling noise, as most LDM re-implementations do;
- every random draw of step ``k`` (timesteps, noise, condition dropout) comes from a generator seeded
  by ``(seed, k)`` and batches are a pure function of ``(seed, k)``, so a resumed run is bit-identical
  to an uninterrupted one, and a run on W processes equals a single-process run on the same global
  batch (each rank takes its slice of the global draws);
- distributed: started under ``torchrun`` (``WORLD_SIZE`` > 1) it uses DistributedDataParallel with
  gloo on CPU and nccl on GPU; rank 0 writes logs, images and checkpoints;
- EMA of the trainable weights; bf16 autocast as an option; tqdm progress, JSONL logs, sample grids,
  atomic checkpoints (``last.safetensors``) and the final ``model.safetensors`` (EMA weights).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from ldmkit.config import LatentDiffusionConfig, load_config
from ldmkit.models.ldm import CHECKPOINT_KIND, LatentDiffusion, images_to_tensor, save_ldm, tensor_to_images
from ldmkit.train.autoencoder import batch_indices
from ldmkit.train.checkpoint import (
    CheckpointError,
    flatten_optimizer_state,
    load_checkpoint,
    load_module_state,
    make_metadata,
    metadata_config,
    module_tensors,
    remove_stale_temp_files,
    save_checkpoint,
    truncate_log,
    unflatten_optimizer_state,
)
from ldmkit.train.schedule import LRSchedule, lr_at, same_past_rates

__all__ = ["DiffusionDataConfig", "DiffusionTrainConfig", "train_diffusion", "export_model", "TRAIN_CHECKPOINT_KIND",
           "load_first_stage"]

TRAIN_CHECKPOINT_KIND = "latent_diffusion_train"
SCHEDULE_FIELDS = {"steps", "lr", "lr_schedule", "decay_start", "final_lr_fraction"}
RESUMABLE_CHANGES = {"log_every", "image_every", "ckpt_every", "out_dir", "num_threads", "save_dtype"}


class DiffusionDataConfig(BaseModel):
    """Which data set feeds training (see ``ldmkit data list``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "shapes"
    split: str = "train"
    seed: int = 0
    cache_size: int = Field(20000, gt=0, description="training images used (and, with cache_latents, encoded once)")
    options: dict[str, Any] = Field(default_factory=dict, description="the data set's own options, passed to "
                                    "load_dataset, e.g. {only_captioned: true} for shapes")


class DiffusionTrainConfig(BaseModel):
    """Everything :func:`train_diffusion` needs. Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")
    model: LatentDiffusionConfig
    data: DiffusionDataConfig = Field(default_factory=DiffusionDataConfig)
    steps: int = Field(gt=0)
    batch_size: int = Field(64, gt=0, description="global batch (split across processes)")
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    lr_schedule: LRSchedule = Field("constant", description="after warmup: constant, or a half-cosine down to "
                                                            "final_lr_fraction * lr at the last step")
    decay_start: int | None = Field(None, ge=0, description="cosine: hold lr until this step, then decay (default: "
                                                            "right after warmup); may be set on resume when "
                                                            "no step already taken changes")
    final_lr_fraction: float = Field(0.0, ge=0.0, le=1.0, description="cosine: final lr as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    fused_optimizer: bool = Field(
        True, description="AdamW(fused=True): the whole update as one kernel per parameter group (27 -> 15 ms a "
                          "step for the zoo's UNets on 2 CPU cores); false: torch's per-parameter AdamW. Rounding "
                          "differs between the two, so it is part of the recipe (the zoo's recipes record false)")
    lr_scale: dict[str, float] = Field(
        default_factory=dict, description="per-part learning-rate factors, {name: factor}: 'unet' or a conditioner's "
                                          "name (e.g. {text: 0.1} fine-tunes a pretrained text tower ten times "
                                          "slower than the UNet); parts not named train at lr")
    init_from: str | None = Field(
        None, description="warm start: a model file (a run's model.safetensors, `ldmkit export` output or zoo:NAME) "
                          "whose UNet and conditioner tensors are copied where name and shape agree; parts it lacks "
                          "(e.g. a conditioner added to the recipe) keep their fresh or pretrained weights. A tensor "
                          "of the same name but another shape is an error. Read once at the start, not on --resume")
    grad_clip: float | None = Field(1.0, gt=0)
    ema: float | None = Field(0.999, gt=0, lt=1, description="EMA decay (off if null)")
    cache_latents: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = Field(0, ge=0)
    log_every: int = Field(50, gt=0)
    image_every: int = Field(1000, gt=0)
    ckpt_every: int = Field(500, gt=0)
    num_images: int = Field(16, gt=0, description="images in each sample grid")
    sample_steps: int = Field(25, gt=0, description="DDIM steps for the sample grids")
    out_dir: str = "runs/ldm"
    save_dtype: Literal["float32", "float16"] = "float32"
    num_threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "DiffusionTrainConfig":
        if self.model.autoencoder is None and (self.model.downsample_factor, self.model.latent_channels) != (1, 3):
            raise ValueError("model.autoencoder is required unless the model is pixel-space (downsample_factor 1, latent_channels 3)")
        names = ["unet"] + [c.instance_name for c in self.model.conditioning.conditioners]
        for name, factor in self.lr_scale.items():
            if name not in names:
                raise ValueError(f"lr_scale: {name!r} is not a part of this model; allowed: {', '.join(names)}")
            if not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"lr_scale.{name}: must be a positive finite number, got {factor!r}")
        return self


def _schedule(cfg: DiffusionTrainConfig) -> dict:
    return {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "schedule": cfg.lr_schedule,
            "final_lr_fraction": cfg.final_lr_fraction, "decay_start": cfg.decay_start}


def _check_resumable(saved: DiffusionTrainConfig, cfg: DiffusionTrainConfig, start: int, path: Path) -> None:
    """Refuse a resume whose config would change the run: only bookkeeping fields may differ, and the
    learning-rate schedule only where it leaves every step already taken as it was."""
    changed = sorted(k for k in DiffusionTrainConfig.model_fields
                     if getattr(saved, k) != getattr(cfg, k) and k not in RESUMABLE_CHANGES | SCHEDULE_FIELDS)
    if changed:
        raise ValueError(f"cannot resume {path}: the config differs in {changed}; only {sorted(RESUMABLE_CHANGES | {'steps'})} "
                         f"may change, and {sorted(SCHEDULE_FIELDS - {'steps'})} where no step already taken changes")
    if not same_past_rates(_schedule(saved), _schedule(cfg), saved.lr, cfg.lr, start):
        raise ValueError(f"cannot resume {path} at step {start}: the new learning-rate schedule changes steps already "
                         f"taken; start the decay (decay_start) at {start} or later")


def parameter_groups(model: LatentDiffusion, lr_scale: dict[str, float]) -> tuple[list[dict], list[float]]:
    """The optimizer's parameter groups and their learning-rate factors.

    Without factors, one group of every trainable parameter (as before ``lr_scale`` existed, so older
    checkpoints resume). With them, the UNet first, then each conditioner with trainable parameters,
    in the stack's order; parts with the same factor still get a group each, so the layout depends on
    the model alone."""
    params = model.trainable_parameters()
    if not lr_scale:
        return [{"params": params}], [1.0]
    owned: dict[int, str] = {}
    for name, conditioner in model.stack.conditioners.items():
        for p in conditioner.parameters():
            owned[id(p)] = name
    parts: dict[str, list] = {"unet": []}
    for p in params:
        parts.setdefault(owned.get(id(p), "unet"), []).append(p)
    kept = [(name, ps) for name, ps in parts.items() if ps]
    return [{"params": ps} for _, ps in kept], [float(lr_scale.get(name, 1.0)) for name, _ in kept]


def warm_start(model: LatentDiffusion, ref: str) -> dict[str, Any]:
    """Copy ``ref``'s UNet and conditioning-stack tensors into ``model`` where name and shape agree.

    Returns what happened: ``{"init_from", "loaded", "of", "kept"}`` (tensors copied, tensors the model
    has, and the names of the model's conditioners the file did not hold any tensor of). Raises
    :class:`CheckpointError` when a tensor of the same name has another shape (the recipes disagree on
    that part's size: say which), when nothing matches (not a warm start of this model at all), or when
    a copied tensor is damaged (:func:`load_module_state`'s checks).
    """
    from ldmkit.train.checkpoint import CheckpointError, load_checkpoint, load_module_state, read_metadata
    from ldmkit.zoo import ZooError, resolve

    try:
        path = resolve(ref)
    except ZooError as exc:
        raise ZooError(f"init_from: {exc}") from None
    meta = read_metadata(path)
    if meta.get("ldmkit.kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"init_from: {path} is not a latent diffusion model (ldmkit.kind="
                              f"{meta.get('ldmkit.kind')!r}); give a run's model.safetensors, an export or zoo:NAME")
    ckpt = load_checkpoint(path)
    parts = {"unet": model.unet, "stack": model.stack}
    source = {f"{part}.{k}": v for part in parts for k, v in ckpt.subset(part + ".").items()}
    own = {f"{part}.{k}": v for part, module in parts.items() for k, v in module.state_dict().items()}
    clash = sorted(f"{k} {tuple(source[k].shape)} -> {tuple(v.shape)}" for k, v in own.items()
                   if k in source and source[k].shape != v.shape)
    if clash:
        shown = "; ".join(clash[:5]) + (f" (and {len(clash) - 5} more)" if len(clash) > 5 else "")
        raise CheckpointError(f"init_from: {path} has tensors of another shape than this recipe's: {shown}")
    matched = [k for k in own if k in source]
    if not matched:
        raise CheckpointError(f"init_from: {path} shares no tensor with this model (is it another model's file?)")
    for part, module in parts.items():  # the matched tensors over the module's own; loaded with every check
        state = module.state_dict()
        state.update({k: v for k, v in ckpt.subset(part + ".").items() if k in state})
        load_module_state(module, state, f"init_from: {path} ({part})")
    held = {k.split(".")[2] for k in source if k.startswith("stack.conditioners.")}
    kept = [name for name in model.stack.names if name not in held]
    return {"init_from": str(ref), "loaded": len(matched), "of": len(own), "kept": kept}


def load_first_stage(ref: str | None, device: torch.device | str = "cpu"):
    """The frozen autoencoder named by ``ref`` (path or ``zoo:NAME``), or None for pixel space."""
    if ref is None:
        return None
    from ldmkit.models.autoencoder import load_autoencoder
    from ldmkit.zoo import resolve

    return load_autoencoder(resolve(ref), device=device).freeze()


class _LossModule(nn.Module):
    """What DDP wraps: calling it computes the loss, so gradient sync hooks fire."""

    def __init__(self, model: LatentDiffusion):
        super().__init__()
        self.model = model

    def forward(self, latents, conditions, t, noise, keep):
        return self.model.loss(latents, conditions, t=t, noise=noise, keep=keep)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 7]).generate_state(1)[0]))


class _Data:
    """Training images (or cached latents) and their conditions, indexed 0..n-1."""

    def __init__(self, cfg: DiffusionTrainConfig, model: LatentDiffusion, device: torch.device, rank: int, progress: bool):
        from ldmkit.data import load_dataset

        from ldmkit.fields import check_keys, sample_value

        check_keys(model.stack.accepted_keys())  # every key a built-in or plugin-declared field, before any data
        dataset = load_dataset(cfg.data.name, split=cfg.data.split, size=cfg.model.image_size, seed=cfg.data.seed,
                               **cfg.data.options)
        self.n = min(len(dataset), cfg.data.cache_size)
        self.keys = sorted(model.stack.accepted_keys())
        samples = (dataset[i] for i in range(self.n))
        images, conds = [], {k: [] for k in self.keys}
        for i, s in enumerate(samples):
            images.append(s.image)
            for k in self.keys:
                value = sample_value(s, k, index=i)
                if value is None:
                    derived = " (the declaring plugin's derive returned None for it)" if k in _derivable(k) else ""
                    raise ValueError(f"data set {cfg.data.name!r} has no {k!r} for sample {len(images) - 1}{derived}, "
                                     f"which {', '.join(model.stack.accepted_keys()[k])} read(s)")
                conds[k].append(value)
        self.images = np.stack(images)
        self.conditions = conds
        self.latents: torch.Tensor | None = None
        self.model = model
        self.device = device
        if cfg.cache_latents:
            chunks = []
            with torch.no_grad():
                it = range(0, self.n, 256)
                if progress and rank == 0:
                    from tqdm import tqdm

                    it = tqdm(it, desc="encoding latents", unit="batch", leave=False)
                for i in it:
                    chunks.append(model.encode_images(images_to_tensor(self.images[i : i + 256]).to(device)).cpu())
            self.latents = torch.cat(chunks)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, list[Any]]]:
        conds = {k: [self.conditions[k][i] for i in idx] for k in self.keys}
        if self.latents is not None:
            return self.latents[torch.from_numpy(idx)].to(self.device), conds
        with torch.no_grad():
            return self.model.encode_images(images_to_tensor(self.images[idx]).to(self.device)), conds


def _derivable(key: str) -> set[str]:
    from ldmkit.registry import get_registry

    f = get_registry().fields.get(key)
    return {key} if f is not None and f.derive is not None else set()


class _EMA:
    """EMA of a model's trainable parameters; buffers copied. Decay warms up as (1+t)/(10+t)."""

    def __init__(self, model: LatentDiffusion, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def pairs(self, model: LatentDiffusion):
        for (name, e), p in zip(self.model.named_parameters(), model.parameters()):
            if p.requires_grad:
                yield e, p

    @torch.no_grad()
    def update(self, model: LatentDiffusion) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in self.pairs(model):
            e.lerp_(p.detach(), 1.0 - d)
        self.updates += 1


def _trainable_tensors(model: LatentDiffusion, prefix: str) -> dict[str, torch.Tensor]:
    return {**module_tensors(model.unet, prefix + "unet."), **module_tensors(model.stack, prefix + "stack.")}


def _load_trainable(model: LatentDiffusion, ckpt: Any, prefix: str) -> None:
    load_module_state(model.unet, ckpt.subset(prefix + "unet."), f"{ckpt.path} ({prefix}unet)")
    load_module_state(model.stack, ckpt.subset(prefix + "stack."), f"{ckpt.path} ({prefix}stack)")


def _sample_grid(path: Path, model: LatentDiffusion, data: _Data, cfg: DiffusionTrainConfig) -> None:
    from PIL import Image

    n = min(cfg.num_images, data.n)
    idx = np.arange(n)
    conds = {k: [data.conditions[k][i] for i in idx] for k in data.keys}
    images = tensor_to_images(model.sample(conds if conds else None, n=None if conds else n, steps=cfg.sample_steps, seed=cfg.seed))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def train_diffusion(
    cfg: DiffusionTrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_done: Callable[[LatentDiffusion], None] | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train as ``cfg`` says; returns ``out_dir/model.safetensors``.

    ``on_step(step, log record)`` runs on rank 0 at every log; ``on_done(model)`` on every rank with its
    trained (raw) model; ``stop_after`` ends early as if killed after that step's checkpoint (for tests).
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    device = _device(rank)
    out = Path(cfg.out_dir)
    ckpt_path, log_path = out / "last.safetensors", out / "log.jsonl"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"resume requested but there is no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} already exists: use --resume to continue that run, or another out_dir")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    autoencoder = load_first_stage(cfg.model.autoencoder, device)
    model = LatentDiffusion(cfg.model, autoencoder).to(device)
    warm = warm_start(model, cfg.init_from) if cfg.init_from and not resume else None
    model.train()
    ema = _EMA(model, cfg.ema) if cfg.ema else None
    params = model.trainable_parameters()
    groups, scales = parameter_groups(model, cfg.lr_scale)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if cfg.fused_optimizer else None)
    start = 0
    if resume:
        ckpt, saved = _read_train_checkpoint(ckpt_path)
        start = int(ckpt.metadata["ldmkit.step"])
        _check_resumable(saved, cfg, start, ckpt_path)
        _load_trainable(model, ckpt, "model.")
        if ema is not None:
            _load_trainable(ema.model, ckpt, "ema.")
            ema.updates = int(ckpt.metadata["ldmkit.ema_updates"])
        opt.load_state_dict(unflatten_optimizer_state(ckpt.tensors, ckpt.metadata, "opt"))

    loss_module: nn.Module = _LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=True)
    data = _Data(cfg, model, device, rank, progress)
    local = cfg.batch_size // world
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="ldm", unit="step", dynamic_ncols=True)
    if rank == 0 and resume:
        truncate_log(log_path, start)  # a killed run may have logged past its last checkpoint
        removed = remove_stale_temp_files(ckpt_path)  # and left a half-written checkpoint behind
        _log(log_path, {"event": "resume", "step": start, **({"removed_temp_files": len(removed)} if removed else {})})
    if rank == 0 and not resume:
        log_path.write_text("")
        _log(log_path, {"event": "start", "config": json.loads(cfg.model_dump_json()), "world_size": world,
                        "parameters": sum(p.numel() for p in params)})
        if warm is not None:
            _log(log_path, {"event": "init_from", **warm})
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0, losses = time.perf_counter(), []
    for step in range(start, end):
        rate = lr_at(step, cfg.lr, **_schedule(cfg))
        for group, scale in zip(opt.param_groups, scales):
            group["lr"] = rate * scale
        idx = batch_indices(step, cfg.batch_size, data.n, cfg.seed)
        g = _step_generator(cfg.seed, step)
        # the global RNG (UNet dropout, plugins' own randomness) is also a function of (seed, step, rank),
        # so that resuming stays exact when such randomness is used
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
        t = model.schedule.sample_timesteps(cfg.batch_size, g)
        latents_shape = (cfg.batch_size, cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
        noise = torch.randn(latents_shape, generator=g)
        keep = model.stack.dropout_keep(cfg.batch_size, g) if model.stack.names else {}
        sl = slice(rank * local, (rank + 1) * local)
        latents, conds = data.batch(idx[sl])
        with autocast:
            loss = loss_module(latents, conds, t[sl].to(device), noise[sl].to(device), {k: v[sl].to(device) for k, v in keep.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if rank == 0 and (done % cfg.log_every == 0 or done == end):
            rec = {"step": done, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                   "sec_per_step": (time.perf_counter() - t0) / len(losses)}
            _log(log_path, rec)
            if on_step:
                on_step(done, rec)
            t0, losses = time.perf_counter(), []
        if rank == 0 and done % cfg.image_every == 0:
            _sample_grid(out / "samples" / f"step_{done:06d}.png", ema.model if ema else model, data, cfg)
            model.train()
        if done % cfg.ckpt_every == 0 or done == end:
            if rank == 0:
                _save_state(ckpt_path, cfg, done, model, ema, opt)
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    final = out / "model.safetensors"
    if rank == 0 and end == cfg.steps:
        save_ldm(ema.model if ema else model, final, dtype=cfg.save_dtype,
                 extra_metadata={"ldmkit.train_steps": cfg.steps})
        _log(log_path, {"event": "done", "step": cfg.steps, "model": str(final)})
    if on_done is not None:
        on_done(model)
    if world > 1:
        dist.barrier()
    return final


def export_model(checkpoint: str | Path, out: str | Path, *, use_ema: bool = True,
                 guidance: float | dict[str, float] | None = None,
                 dtype: Literal["float32", "float16"] | None = None, bundle_autoencoder: bool = True) -> Path:
    """Write a model file (as training's final ``model.safetensors``) from a training checkpoint.

    For stopping a run early and keeping what it has learnt: the weights are the checkpoint's EMA
    weights (or the raw ones with ``use_ema=False``); ``guidance`` sets the model's default guidance
    (``config.guidance``, validated); ``dtype`` the stored precision (default: the recipe's
    ``save_dtype``). The recipe's autoencoder is loaded to be bundled as training does, or, with
    ``bundle_autoencoder=False`` and a ``zoo:`` autoencoder, referenced (see :func:`save_ldm`).
    """
    if Path(out).exists() and Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"{out} is the checkpoint being exported; write the model file elsewhere")
    ckpt, cfg = _read_train_checkpoint(checkpoint)
    model_cfg = cfg.model
    if guidance is not None:
        model_cfg = load_config({**model_cfg.model_dump(mode="json"), "guidance": guidance})
    prefix = "ema." if use_ema else "model."
    if use_ema and not ckpt.subset("ema."):
        raise CheckpointError(f"{checkpoint} holds no EMA weights (the run had ema: null); use use_ema=False")
    model = LatentDiffusion(model_cfg, load_first_stage(model_cfg.autoencoder))
    _load_trainable(model, ckpt, prefix)
    step = int(ckpt.metadata["ldmkit.step"])
    return save_ldm(model.eval(), out, dtype=dtype or cfg.save_dtype, extra_metadata={"ldmkit.train_steps": step},
                    bundle_autoencoder=bundle_autoencoder)


def _read_train_checkpoint(path: str | Path) -> tuple[Any, DiffusionTrainConfig]:
    """A diffusion training checkpoint and the config it was written with; CheckpointError for other files."""
    ckpt = load_checkpoint(path)
    if ckpt.metadata.get("ldmkit.kind") != TRAIN_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a diffusion training checkpoint")
    try:
        return ckpt, DiffusionTrainConfig.model_validate(metadata_config(path, ckpt.metadata))
    except ValidationError as exc:
        raise CheckpointError(f"{path} holds an invalid training config: {exc}") from None


def _save_state(path: Path, cfg: DiffusionTrainConfig, step: int, model: LatentDiffusion, ema: _EMA | None,
                opt: torch.optim.Optimizer) -> None:
    tensors = _trainable_tensors(model, "model.")
    meta = make_metadata(TRAIN_CHECKPOINT_KIND, cfg, **{"ldmkit.step": str(step)})
    if ema is not None:
        tensors.update(_trainable_tensors(ema.model, "ema."))
        meta["ldmkit.ema_updates"] = str(ema.updates)
    t, m = flatten_optimizer_state(opt.state_dict(), "opt")
    tensors.update(t)
    meta.update(m)
    save_checkpoint(path, tensors, meta)


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
