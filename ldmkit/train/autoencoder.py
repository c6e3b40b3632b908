"""Training the first stage: :class:`AutoencoderTrainConfig` and :func:`train_autoencoder`.

One loop, no framework. Per step: a batch (a deterministic function of ``(seed, step)``, optionally
augmented, also as a function of ``(seed, step)``), the
autoencoder update (L1 + KL/codebook + adaptive-weight hinge GAN once ``disc_start`` is reached), VQ
dead-code restarts, the EMA update, then the discriminator update. Outputs in ``out_dir``:

- ``log.jsonl``: one JSON object per ``log_every`` steps (losses, batch PSNR, lr, seconds per step)
  plus ``start`` / ``resume`` / ``done`` events;
- ``samples/step_000500.png``: originals (top row) above their reconstructions (bottom row);
- ``last.safetensors``: the full training state (model, discriminator, EMA, optimizers, RNG, step),
  written atomically every ``ckpt_every`` steps and at the end;
- ``model.safetensors``: at the end, the autoencoder alone (EMA weights if ``ema`` is set), with its
  config and the latent scale factor -- load it with :func:`load_autoencoder`.

``resume=True`` continues from ``last.safetensors``; on the CPU the result is bit-identical to an
uninterrupted run (data order, RNG streams and optimizer states are all restored).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from ldmkit.data import load_dataset
from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder, save_autoencoder
from ldmkit.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldmkit.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    flatten_optimizer_state,
    load_checkpoint,
    load_module_state,
    make_metadata,
    metadata_config,
    module_tensors,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    truncate_log,
    unflatten_optimizer_state,
)
from ldmkit.train.losses import FirstStageLoss, LossWeights, PerceptualLoss
from ldmkit.train.schedule import lr_at

__all__ = [
    "AutoencoderDataConfig",
    "AugmentConfig",
    "augment_images",
    "AutoencoderTrainConfig",
    "load_train_config",
    "train_autoencoder",
    "load_autoencoder",
    "batch_indices",
    "images_to_tensor",
    "TRAIN_CHECKPOINT_KIND",
]

#: ``ldmkit.kind`` of the training-state checkpoint ``last.safetensors``.
TRAIN_CHECKPOINT_KIND = "autoencoder-train"
#: Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "image_every", "ckpt_every", "out_dir", "num_threads", "save_dtype"})


class AutoencoderDataConfig(BaseModel):
    """Which images to train on: ``ldmkit.data.load_dataset(name, split=, size=, seed=, **options)``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("shapes", description="data set: shapes, photos, emoji, digits, folder:PATH, manifest:PATH")
    split: str = Field("train", description="split to train on")
    size: int = Field(32, gt=0, description="image side in pixels")
    seed: int = Field(0, ge=0, description="seed of random data sets (shapes scenes, photo crops)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra load_dataset arguments, e.g. {n: 8192}")


class AugmentConfig(BaseModel):
    """Per-image augmentations, drawn from ``numpy.random.default_rng([seed, step, 1])`` (resumable)."""

    model_config = ConfigDict(extra="forbid")

    hflip: bool = Field(False, description="mirror left-right with probability 1/2")
    channel_permute: bool = Field(
        False, description="shuffle the RGB channel order: teaches colour-agnostic coding when few sources are seen"
    )


class AutoencoderTrainConfig(BaseModel):
    """Everything :func:`train_autoencoder` needs. Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")

    model: AutoencoderConfig
    data: AutoencoderDataConfig = Field(default_factory=AutoencoderDataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)

    steps: int = Field(gt=0, description="optimizer steps in total")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(4.5e-4, gt=0, description="Adam learning rate of the autoencoder")
    disc_lr: float | None = Field(None, gt=0, description="learning rate of the discriminator (default: lr)")
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas (reference: 0.5, 0.9)")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="after warmup: constant or cosine")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup")
    final_lr_fraction: float = Field(0.0, ge=0.0, le=1.0, description="cosine: final lr as a fraction of lr")
    grad_clip: float | None = Field(None, gt=0, description="clip the autoencoder gradient norm (off if null)")

    pixel_loss: Literal["l1", "l2"] = Field("l1", description="reconstruction loss: L1 (reference) or squared error")
    kl_weight: float = Field(1e-6, ge=0, description="KL weight (KL per image value, see ldmkit.train.losses)")
    codebook_weight: float = Field(1.0, ge=0, description="VQ codebook + commitment loss weight")
    disc_start: int = Field(0, ge=0, description="step at which the GAN losses switch on")
    disc_weight: float = Field(0.5, ge=0, description="multiplies the adaptive GAN weight")
    perceptual_weight: float = Field(0.0, ge=0, description="LPIPS-style loss weight (needs perceptual_weights)")
    perceptual_weights: str | None = Field(None, description="local .safetensors VGG16 weights for the perceptual loss")

    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay of the autoencoder weights (off if null)")
    seed: int = Field(0, ge=0, description="seeds initialization, data order and sampling")
    log_every: int = Field(50, gt=0)
    image_every: int = Field(500, gt=0)
    ckpt_every: int = Field(500, gt=0)
    num_images: int = Field(8, gt=0, description="images in each reconstruction grid")
    out_dir: str = Field("runs/autoencoder", description="where logs, samples and checkpoints go")
    save_dtype: Literal["float32", "float16"] = Field("float32", description="parameter dtype of model.safetensors")
    scale_batches: int = Field(4, gt=0, description="batches encoded to estimate the latent std")
    num_threads: int | None = Field(None, gt=0, description="torch.set_num_threads (leave torch's default if null)")

    @model_validator(mode="after")
    def _check(self) -> AutoencoderTrainConfig:
        f = self.model.downsample_factor
        if self.data.size % f:
            raise ValueError(
                f"data.size={self.data.size} is not divisible by the model's downsampling factor f={f} "
                f"(ch_mult={self.model.ch_mult})"
            )
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights: a local .safetensors VGG16 file "
                "(none ships with ldmkit); set perceptual_weight: 0 to train without it"
            )
        if self.discriminator.in_channels != self.model.in_channels:
            raise ValueError(
                f"discriminator.in_channels={self.discriminator.in_channels} must equal "
                f"model.in_channels={self.model.in_channels}"
            )
        return self


def load_train_config(path: str | Path, **overrides: Any) -> AutoencoderTrainConfig:
    """Read a YAML recipe (e.g. ``configs/autoencoder/shapes-kl-f4.yaml``); ``overrides`` replace top-level keys."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.update(overrides)
    return AutoencoderTrainConfig.model_validate(raw)


# ---------------------------------------------------------------------------------------------------
# Data


def batch_indices(step: int, batch_size: int, n: int, seed: int, _cache: dict[Any, np.ndarray] | None = None) -> np.ndarray:
    """Dataset indices of batch ``step``: consecutive slices of per-epoch permutations.

    Epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``; batches run through the
    concatenation of epochs (a batch may straddle two). A pure function of its arguments, so a
    resumed run sees exactly the batches an uninterrupted one would.
    """
    cache = {} if _cache is None else _cache
    start = step * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    filled = 0
    while filled < batch_size:
        epoch, pos = divmod(start + filled, n)
        key = (seed, epoch, n)
        if key not in cache:
            cache.clear()  # keep one epoch in memory
            cache[key] = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch_size - filled, n - pos)
        out[filled : filled + take] = cache[key][pos : pos + take]
        filled += take
    return out


def augment_images(images: np.ndarray, cfg: AugmentConfig, seed: int, step: int) -> np.ndarray:
    """Apply ``cfg`` to a (B, H, W, C) uint8 batch; a pure function of ``(seed, step)`` and the images."""
    if not (cfg.hflip or cfg.channel_permute):
        return images
    rng = np.random.default_rng([seed, step, 1])
    out = images.copy()
    if cfg.hflip:
        flip = rng.random(len(out)) < 0.5
        out[flip] = out[flip, :, ::-1]
    if cfg.channel_permute and out.shape[-1] > 1:
        for i in range(len(out)):
            out[i] = out[i][..., rng.permutation(out.shape[-1])]
    return out


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> Tensor:
    """HxWx3 uint8 images -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im) for im in images])
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"expected equally sized HxWxC uint8 images, got an array {arr.shape} {arr.dtype}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _tensor_to_uint8(x: Tensor) -> np.ndarray:
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _save_grid(path: Path, originals: Tensor, reconstructions: Tensor) -> None:
    """Originals in the top row, reconstructions below, 2 px gaps."""
    top, bottom = _tensor_to_uint8(originals), _tensor_to_uint8(reconstructions)
    n, h, w, c = top.shape
    gap = 2
    grid = np.full((2 * h + 3 * gap, n * w + (n + 1) * gap, c), 255, dtype=np.uint8)
    for i in range(n):
        x0 = gap + i * (w + gap)
        grid[gap : gap + h, x0 : x0 + w] = top[i]
        grid[2 * gap + h : 2 * gap + 2 * h, x0 : x0 + w] = bottom[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


# ---------------------------------------------------------------------------------------------------
# Helpers


class _EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` so short runs are not dominated by the
    initialization.
    """

    def __init__(self, model: Autoencoder, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: Autoencoder) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
        self.updates += 1


def _lr_at(cfg: AutoencoderTrainConfig, step: int, base: float) -> float:
    return lr_at(step, base, steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                 final_lr_fraction=cfg.final_lr_fraction)


def _batch_psnr(x: Tensor, x_hat: Tensor) -> float:
    """Mean per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - x_hat.detach().clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def _config_diff(a: AutoencoderTrainConfig, b: AutoencoderTrainConfig) -> list[str]:
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return [k for k in da if k not in RESUMABLE_CHANGES and da[k] != db.get(k)]


# ---------------------------------------------------------------------------------------------------
# The loop


def train_autoencoder(
    cfg: AutoencoderTrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train an autoencoder as ``cfg`` says; returns the path of ``out_dir/model.safetensors``.

    Args:
        cfg: the validated recipe.
        resume: continue from ``out_dir/last.safetensors`` (error if missing). Without it an existing
            ``last.safetensors`` is an error, so a finished run is never overwritten by accident.
        progress: show a tqdm bar with the current losses.
        on_step: called after every step with ``(steps_done, logs)`` (for callers that monitor runs).
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    ckpt_path, log_path = out / "last.safetensors", out / "log.jsonl"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt_path}")
    if not resume and ckpt_path.exists():
        raise FileExistsError(
            f"{ckpt_path} already exists: pass resume=True to continue that run, or choose another out_dir"
        )
    out.mkdir(parents=True, exist_ok=True)

    dataset = load_dataset(cfg.data.name, split=cfg.data.split, size=cfg.data.size, seed=cfg.data.seed, **cfg.data.options)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"data set {cfg.data.name!r} (split {cfg.data.split!r}) is empty")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = Autoencoder(cfg.model)
    disc = NLayerDiscriminator(cfg.discriminator)
    perceptual = PerceptualLoss(cfg.perceptual_weights) if cfg.perceptual_weight > 0 and cfg.perceptual_weights else None
    weights = LossWeights(cfg.kl_weight, cfg.codebook_weight, cfg.disc_weight, cfg.disc_start,
                          cfg.perceptual_weight, cfg.pixel_loss)
    loss_fn = FirstStageLoss(disc, weights, perceptual)
    opt_ae = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas)
    ema = _EMA(model, cfg.ema) if cfg.ema else None

    start = 0
    if resume:
        start = _restore(ckpt_path, cfg, model, disc, ema, opt_ae, opt_d)
        truncate_log(log_path, start)
        removed = remove_stale_temp_files(ckpt_path)  # a run killed mid-checkpoint leaves one behind
        _log(log_path, {"event": "resume", "step": start, "time": time.time(),
                        **({"removed_temp_files": len(removed)} if removed else {})})
    else:
        log_path.write_text("")
        _log(log_path, {"event": "start", "step": 0, "time": time.time(), "params": model.num_parameters(),
                        "config": cfg.model_dump(mode="json")})

    epoch_cache: dict[Any, np.ndarray] = {}

    def batch(step: int, augment: bool = True) -> Tensor:
        idx = batch_indices(step, cfg.batch_size, n, cfg.seed, epoch_cache)
        images = np.stack([np.asarray(dataset[int(i)].image) for i in idx])
        return images_to_tensor(augment_images(images, cfg.augment, cfg.seed, step) if augment else images)

    grid_images = images_to_tensor([dataset[i].image for i in range(min(cfg.num_images, n))])
    model.train()
    loss_fn.train()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, dynamic_ncols=True, desc="autoencoder")
    window: dict[str, list[float]] = {}
    t_last = time.perf_counter()
    for step in range(start, cfg.steps):
        lr = _lr_at(cfg, step, cfg.lr)
        for g in opt_ae.param_groups:
            g["lr"] = lr
        for g in opt_d.param_groups:
            g["lr"] = _lr_at(cfg, step, cfg.disc_lr or cfg.lr)
        x = batch(step)

        out_ae = model(x)
        loss, logs = loss_fn.generator_loss(x, out_ae, model.last_layer, step)
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt_ae.step()
        logs.update(out_ae.stats)
        if model.quantize is not None:
            logs["restarted"] = float(model.quantize.restart_dead_codes())
        if ema is not None:
            ema.update(model)
        if loss_fn.disc_active(step):
            d_loss, d_logs = loss_fn.discriminator_loss(x, out_ae.reconstruction, step)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            logs.update(d_logs)
        logs["psnr"] = _batch_psnr(x, out_ae.reconstruction)
        done = step + 1
        for k, v in logs.items():
            window.setdefault(k, []).append(v)
        bar.update(1)
        bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "l1", "psnr", "d_loss") if k in logs}, refresh=False)

        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            record = {"step": done, "lr": lr, **{k: float(np.mean(v)) for k, v in window.items()}}
            record["sec_per_step"] = (now - t_last) / len(window["loss"])
            _log(log_path, record)
            window, t_last = {}, now
        if done % cfg.image_every == 0 or done == cfg.steps:
            viewer = ema.model if ema is not None else model
            with torch.no_grad():
                viewer.eval()
                rec = viewer.reconstruct(grid_images)
                viewer.train(ema is None)
            _save_grid(out / "samples" / f"step_{done:06d}.png", grid_images, rec)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            _save_state(ckpt_path, cfg, done, model, disc, ema, opt_ae, opt_d)
        if on_step is not None:
            on_step(done, logs)
    bar.close()

    final = ema.model if ema is not None else model
    final.eval()
    scale = _estimate_scale(cfg, final, batch)
    path = save_autoencoder(
        final, out / "model.safetensors", dtype=cfg.save_dtype,
        extra_metadata={"ldmkit.train": json.dumps({"steps": cfg.steps, "data": cfg.data.model_dump(mode="json"),
                                                     "seed": cfg.seed, "ema": cfg.ema})},
    )
    _log(log_path, {"event": "done", "step": cfg.steps, "time": time.time(), "scale_factor": scale,
                    "model": str(path)})
    return path


@torch.no_grad()
def _estimate_scale(cfg: AutoencoderTrainConfig, model: Autoencoder, batch: Callable[[int, bool], Tensor]) -> float:
    """1/std of the unscaled latents of the first ``scale_batches`` batches (if ``scale_factor='std'``)."""
    if cfg.model.scale_factor != "std":
        return float(model.scale_factor)
    z = torch.cat([model.encode(batch(i, False), scaled=False) for i in range(cfg.scale_batches)])
    return model.set_scale_from_std(z)


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _save_state(
    path: Path, cfg: AutoencoderTrainConfig, step: int, model: Autoencoder, disc: NLayerDiscriminator,
    ema: _EMA | None, opt_ae: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
) -> None:
    tensors = {**module_tensors(model, "model."), **module_tensors(disc, "disc.")}
    meta = make_metadata(TRAIN_CHECKPOINT_KIND, cfg, **{"ldmkit.step": str(step)})
    if ema is not None:
        tensors.update(module_tensors(ema.model, "ema."))
        meta["ldmkit.ema_updates"] = str(ema.updates)
    for prefix, opt in (("opt_ae", opt_ae), ("opt_d", opt_d)):
        t, m = flatten_optimizer_state(opt.state_dict(), prefix)
        tensors.update(t)
        meta.update(m)
    t, m = capture_rng_state("rng")
    tensors.update(t)
    meta.update(m)
    save_checkpoint(path, tensors, meta)


def _restore(
    path: Path, cfg: AutoencoderTrainConfig, model: Autoencoder, disc: NLayerDiscriminator,
    ema: _EMA | None, opt_ae: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
) -> int:
    ckpt = load_checkpoint(path)
    if ckpt.metadata.get("ldmkit.kind") != TRAIN_CHECKPOINT_KIND:
        raise CheckpointError(
            f"{path} is not an autoencoder training checkpoint (ldmkit.kind={ckpt.metadata.get('ldmkit.kind')!r})"
        )
    try:
        saved = AutoencoderTrainConfig.model_validate(metadata_config(path, ckpt.metadata))
    except ValidationError as exc:
        raise CheckpointError(f"{path} holds an invalid training config: {exc}") from None
    changed = _config_diff(saved, cfg)
    if changed:
        raise ValueError(
            f"cannot resume {path}: the config differs in {changed}; only {sorted(RESUMABLE_CHANGES)} may change"
        )
    load_module_state(model, ckpt.subset("model."), f"{path} (model)")
    load_module_state(disc, ckpt.subset("disc."), f"{path} (discriminator)")
    if ema is not None:
        load_module_state(ema.model, ckpt.subset("ema."), f"{path} (ema)")
        ema.updates = int(ckpt.metadata["ldmkit.ema_updates"])
    opt_ae.load_state_dict(unflatten_optimizer_state(ckpt.tensors, ckpt.metadata, "opt_ae"))
    opt_d.load_state_dict(unflatten_optimizer_state(ckpt.tensors, ckpt.metadata, "opt_d"))
    restore_rng_state(ckpt.tensors, ckpt.metadata, "rng")
    return int(ckpt.metadata["ldmkit.step"])
