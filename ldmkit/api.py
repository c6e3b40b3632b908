"""Loading models by reference, and turning them into image generators for ``ldmkit eval``.

``ldmkit.load("zoo:shapes-kl-f4")`` or ``ldmkit.load("runs/x/model.safetensors")`` reads the file's
metadata (never a pickle), checks what kind of model it holds, and rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ldmkit.data.base import Sample

__all__ = ["load", "model_kind", "recon_generator", "diffusion_generator", "Generator"]

Generator = Callable[[list[Sample]], list[np.ndarray]]


def model_kind(ref: str | Path) -> str:
    """``autoencoder`` or ``latent_diffusion`` (from the file's metadata)."""
    from ldmkit.train.checkpoint import CheckpointError, read_metadata
    from ldmkit.zoo import resolve

    path = resolve(ref)
    kind = read_metadata(path).get("ldmkit.kind")
    if kind not in {"autoencoder", "latent_diffusion"}:
        raise CheckpointError(
            f"{path} holds ldmkit.kind={kind!r}; ldmkit.load takes 'autoencoder' or 'latent_diffusion' files "
            "(training checkpoints are resumed with `ldmkit train --resume`)"
        )
    return kind


def load(ref: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """The model behind ``ref`` (a path or ``zoo:NAME``): an Autoencoder or a LatentDiffusion, in eval mode."""
    from ldmkit.zoo import resolve

    path = resolve(ref)
    if model_kind(path) == "autoencoder":
        from ldmkit.models.autoencoder import load_autoencoder

        return load_autoencoder(path, device=device)
    from ldmkit.models.ldm import load_ldm

    return load_ldm(path, device=device)


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class ReconGenerator:
    """Reconstructs each condition's image with an autoencoder; tracks VQ code usage."""

    def __init__(self, model: Any, batch_size: int = 64):
        self.model = model
        self.batch_size = batch_size
        self.codes: list[torch.Tensor] = []

    @torch.inference_mode()
    def __call__(self, conditions: list[Sample]) -> list[np.ndarray]:
        from ldmkit.models.ldm import images_to_tensor, tensor_to_images

        out: list[np.ndarray] = []
        device = next(self.model.parameters()).device
        for chunk in _batches(conditions, self.batch_size):
            x = images_to_tensor([c.image for c in chunk]).to(device)
            if self.model.config.kind == "vq":
                h = self.model.encode_features(x)
                self.codes.append(self.model.quantize.codes(h).flatten().cpu())
            out.extend(tensor_to_images(self.model.reconstruct(x).clamp(-1, 1)))
        return out

    def extra_metrics(self) -> dict[str, float]:
        """``codebook_usage`` (fraction of codes used) and ``perplexity`` for VQ models."""
        if not self.codes:
            return {}
        codes = torch.cat(self.codes)
        n = self.model.config.n_embed
        counts = torch.bincount(codes, minlength=n).double()
        p = counts / counts.sum()
        nz = p[p > 0]
        return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


def recon_generator(model: Any, batch_size: int = 64) -> ReconGenerator:
    return ReconGenerator(model, batch_size)


class DiffusionGenerator:
    """Samples one image per condition, passing every condition key the model accepts."""

    def __init__(self, model: Any, *, sampler: str = "ddim", steps: int = 50, guidance: float | Mapping[str, float] | None = None,
                 seed: int = 0, batch_size: int = 64, unconditional: bool = False,
                 options: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None):
        self.model = model
        accepted = model.stack.accepted_keys()
        if keys is not None:
            unknown = [k for k in keys if k not in accepted]
            if unknown:
                raise ValueError(f"this model reads no {', '.join(map(repr, unknown))}; it reads: {', '.join(sorted(accepted)) or 'nothing'}")
        # the condition keys given to the model (None: every key it reads); the rest get their nulls
        self.keys = None if keys is None else sorted(keys)
        self.options = dict(options or {})  # more keyword arguments of model.sample (paste, precision, ...)
        self.sampler = sampler
        self.steps = steps
        self.guidance = guidance
        self.seed = seed
        self.batch_size = batch_size
        self.unconditional = unconditional

    def __call__(self, conditions: list[Sample]) -> list[np.ndarray]:
        from tqdm import tqdm

        from ldmkit.models.ldm import tensor_to_images

        from ldmkit.fields import check_keys, sample_value

        keys = [] if self.unconditional else self.keys if self.keys is not None else sorted(self.model.stack.accepted_keys())
        check_keys({k: self.model.stack.accepted_keys()[k] for k in keys})
        out: list[np.ndarray] = []
        chunks = list(_batches(conditions, self.batch_size))
        for b, chunk in enumerate(tqdm(chunks, desc="sampling", unit="batch", leave=False, disable=len(chunks) < 2)):
            conds = {k: [sample_value(c, k) for c in chunk] for k in keys}
            missing = [k for k, v in conds.items() if any(x is None for x in v)]
            if missing:
                raise ValueError(f"the evaluation conditions carry no {', '.join(missing)}, which this model needs")
            images = self.model.sample(conds or None, n=None if conds else len(chunk), sampler=self.sampler,
                                       steps=self.steps, guidance=self.guidance, seed=self.seed + 1000 * b,
                                       **self.options)
            out.extend(tensor_to_images(images))
        return out


def diffusion_generator(model: Any, **kw: Any) -> DiffusionGenerator:
    return DiffusionGenerator(model, **kw)
