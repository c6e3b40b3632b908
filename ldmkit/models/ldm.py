"""A latent diffusion model: frozen first stage + conditioning stack + UNet + noise schedule.

One readable class. Training calls :meth:`LatentDiffusion.loss` on latents and a condition batch;
sampling (:meth:`LatentDiffusion.sample`) encodes the conditions once, wraps the UNet in a
classifier-free-guidance denoiser evaluated in one batched call per step, runs a sampler in latent
space and decodes. With ``autoencoder=None`` the same model works in pixel space (f = 1), which is what
the latent-versus-pixel benchmark compares.

Files: :func:`save_ldm` writes UNet, stack and first-stage weights to one safetensors file with both
configs in its metadata; :func:`load_ldm` re-validates the configs through the plugin registry (a
missing plugin fails with a clear message) before any tensor is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ldmkit.conditioning import Conditioner
from ldmkit.config import LatentDiffusionConfig
from ldmkit.diffusion.guidance import GuidedDenoiser
from ldmkit.diffusion.samplers import SAMPLERS, as_eps_denoiser, get_sampler
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmkit.models.unet import UNet
from ldmkit.registry import Registry, get_registry
from ldmkit.wiring import build_stack

__all__ = ["LatentDiffusion", "save_ldm", "load_ldm", "CHECKPOINT_KIND", "images_to_tensor", "tensor_to_images"]

CHECKPOINT_KIND = "latent_diffusion"


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> Tensor:
    """H×W×3 uint8 images → (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[-1] != 3:
        raise ValueError(f"expected H x W x 3 uint8 images of one size, got an array {arr.shape} {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → B×H×W×3 uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class LatentDiffusion(nn.Module):
    """See the module docstring. ``autoencoder`` is frozen here; ``None`` means pixel space."""

    def __init__(
        self,
        config: LatentDiffusionConfig,
        autoencoder: Autoencoder | None,
        registry: Registry | None = None,
    ):
        super().__init__()
        self.config = config
        if autoencoder is not None:
            if autoencoder.downsample_factor != config.downsample_factor:
                raise ValueError(
                    f"downsample_factor is {config.downsample_factor} in the config but the autoencoder's is "
                    f"{autoencoder.downsample_factor}"
                )
            if autoencoder.latent_channels != config.latent_channels:
                raise ValueError(
                    f"latent_channels is {config.latent_channels} in the config but the autoencoder has "
                    f"{autoencoder.latent_channels}"
                )
            autoencoder.freeze()
        elif (config.downsample_factor, config.latent_channels) != (1, 3):
            raise ValueError("a pixel-space model (no autoencoder) needs downsample_factor: 1 and latent_channels: 3")
        self.autoencoder = autoencoder
        encode_image = self.encode_images if autoencoder is not None else None
        self.stack = build_stack(config, registry, encode_image=encode_image)
        self.unet = UNet(config.unet, config.latent_channels, self.stack.wiring())
        self.schedule = NoiseSchedule.from_config(config.diffusion)

    # -- first stage ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_images(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] → scaled latents (identity in pixel space)."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.encode(x)

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents → images in [-1, 1] (identity in pixel space)."""
        if self.autoencoder is None:
            return z
        return self.autoencoder.decode(z)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """UNet and the stack's trainable parameters (frozen conditioners and the first stage excluded)."""
        return [p for p in self.unet.parameters() if p.requires_grad] + self.stack.trainable_parameters()

    # -- training ------------------------------------------------------------------------------
    def unet_call(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.unet(x, t, cond.context, cond.context_mask, cond.channels, cond.vector)

    def loss(
        self,
        latents: Tensor,
        conditions: Mapping[str, Sequence[Any]],
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        keep: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The simple loss on a batch of latents; conditions dropped to their nulls per ``keep``
        (drawn from the stack's dropout when None and in training mode)."""
        b = latents.shape[0]
        draw_on = generator.device if generator is not None else latents.device
        if t is None:
            t = self.schedule.sample_timesteps(b, generator, device=draw_on).to(latents.device)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=draw_on).to(latents.device)
        if self.stack.names:
            cond = self.stack.compose(self.stack.encode(conditions, device=latents.device), keep, generator=generator)
        else:
            cond = None
        x_t = self.schedule.q_sample(latents, t, noise)
        if cond is None:
            prediction = self.unet(x_t, t)
        else:
            prediction = self.unet_call(x_t, t, cond)
        target = self.schedule.target(latents, noise, t)
        return (prediction.float() - target.float()).pow(2).mean()

    # -- sampling ------------------------------------------------------------------------------
    def check_conditions(self, conditions: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        """Keys must be ones this model accepts; every list the same length. Raises ValueError naming the key."""
        accepted = self.stack.accepted_keys()
        unknown = [k for k in conditions if k not in accepted]
        if unknown:
            raise ValueError(
                f"this model does not take condition(s) {', '.join(map(repr, unknown))}; it accepts: "
                f"{', '.join(sorted(accepted)) or '(none: unconditional)'}"
            )
        lengths = {k: len(v) for k, v in conditions.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"every condition needs one value per image; got lengths {lengths}")
        return {k: list(v) for k, v in conditions.items()}

    @torch.inference_mode()
    def sample(
        self,
        conditions: Mapping[str, Sequence[Any]] | None = None,
        *,
        n: int | None = None,
        guidance: float | Mapping[str, float] | None = None,
        negative: Mapping[str, Sequence[Any]] | None = None,
        sampler: str = "ddim",
        steps: int = 50,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        callback: Callable[[dict[str, Any]], Any] | None = None,
        keep_known: bool = True,
        paste: bool = True,
        precision: str = "fp32",
        cuda_graph: bool = False,
        prepack: bool = False,
        compile: bool = False,
        **sampler_options: Any,
    ) -> Tensor:
        """Generate images in [-1, 1], shape (B, 3, H, W).

        ``conditions`` maps batch keys (``label``, ``caption``, ...) to one value per image; keys left
        out are unconditional (their nulls). ``guidance`` is one scale (joint form) or
        ``{conditioner name: scale}`` (per-conditioner form; a condition key such as ``caption`` as the name
        guides every conditioner reading it as one); ``None`` uses the model's default
        (``config.guidance``). ``height``/``width`` larger than the
        training size sample convolutionally (paper §4.3.2).

        Conditioners that know part of the result (inpainting: :meth:`Conditioner.known_latents`) keep
        it: with ``keep_known`` the model sees the known latents, noised to each step's level, in place
        of its own (any sampler; the paper's and CompVis' blend), and the final latents take the known
        ones there; ``paste`` (default on, as CompVis' inpainting script does) also copies the known
        pixels over the decoded image, so they come back exactly — without it, the pixels near the hole
        that share a latent cell with it are regenerated too. Neither applies to models without such a
        conditioner.

        ``precision="bf16"`` runs the UNet under bfloat16 autocast (its convolutions and matrix products;
        the sampler's arithmetic, guidance, conditioners and decoder stay float32): about 2x faster on
        CPUs with native bfloat16 (AVX512-BF16, AMX) at large batches, with results that differ slightly
        from float32 ones (opt-in; docs/performance.md has the measured speed and metric).

        ``cuda_graph=True`` (a model on a CUDA device only) captures the guided UNet call of the first step
        in a CUDA graph and replays it at every later step: one launch per step instead of hundreds of small
        kernel launches, which dominate at the zoo's 8 x 8 latents. The same kernels run on the same
        inputs, so the images equal those of the plain path; if capture fails, sampling continues without
        it, with a warning.

        ``prepack=True`` (a CPU model) runs the UNet channels-last with its convolution and large linear
        weights reordered once for oneDNN (once for all chunks of ``max_batch`` images), residual adds fused
        into them, q/k/v and the timestep projections each in one product, and the context's keys and values
        computed once per chunk instead of at every step (:mod:`ldmkit.models.prepack`). The same network up
        to float rounding (opt-in, because the images can differ from the default path's in the last bits);
        docs/performance.md has the speed.

        ``compile=True`` (a CPU model) runs the UNet through ``torch.compile`` (inductor) with its weights
        frozen into the compiled code (:mod:`ldmkit.models.compiled`): the fastest float32 step at small batches, after a
        compile of tens of seconds at the first step (and again for a new batch shape, or after the weights
        change); it is repaid only after many steps of one batch shape (about 1,700 at batch 32 on 2 cores;
        for a single run ``prepack`` is faster). The same network up to float rounding (opt-in); if compilation
        fails, sampling continues on the plain path with a warning. Not combined with ``prepack``.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be true or false; got {cuda_graph!r}")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device; this one is on {self.device.type} "
                             "(ldmkit.load(..., device='cuda'))")
        if not isinstance(prepack, bool):
            raise ValueError(f"prepack must be true or false; got {prepack!r}")
        if prepack and self.device.type != "cpu":
            raise ValueError(f"prepack=True is for a model on the CPU; this one is on {self.device.type} "
                             "(on a GPU use cuda_graph=True)")
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false; got {compile!r}")
        if compile and self.device.type != "cpu":
            raise ValueError(f"compile=True is for a model on the CPU; this one is on {self.device.type} "
                             "(on a GPU use cuda_graph=True)")
        if compile and prepack:
            raise ValueError("compile=True and prepack=True are alternatives (both speed up the CPU's UNet step); "
                             "choose one")
        conditions = self.check_conditions(conditions or {})
        explicit_guidance = guidance is not None
        if guidance is None:
            guidance = self.config.guidance
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        sizes = {len(v) for v in conditions.values()}
        b = sizes.pop() if sizes else n
        if b is None or b < 1:
            raise ValueError("give conditions (one value per image) or n >= 1 for unconditional sampling")
        if n is not None and n != b:
            raise ValueError(f"n={n} but the conditions hold {b} values")
        f = self.config.downsample_factor
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        multiple = f * self.unet.min_size_multiple
        for what, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"{what} must be a positive multiple of {multiple} pixels; got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - 1000 * (b // self.max_batch + 1):
            raise ValueError(f"seed must be an integer in 0..2**63-1 (less room for batch offsets); got {seed!r}")
        self.check_memory(min(b, self.max_batch), height, width, guided=bool(self.stack.names))
        if b > self.max_batch:  # divisible work: sample max_batch at a time (chunk k uses seed + 1000 k)
            out_bytes = b * 3 * height * width * 4
            if out_bytes > 0.5 * _available_memory(self.device):
                raise MemoryError(
                    f"{b:,} images of {height}x{width} need {_gib(out_bytes)} for the result alone, more than half "
                    f"of this machine's {_gib(_available_memory(self.device))}; sample in parts "
                    "(`ldmkit sample` writes images as it goes)"
                )
            parts = []
            with self._fast_path(prepack, compile):  # packed or compiled once for all chunks
                for k, start in enumerate(range(0, b, self.max_batch)):
                    part = {key: v[start : start + self.max_batch] for key, v in conditions.items()}
                    neg = {key: v[start : start + self.max_batch] for key, v in (negative or {}).items()} or None
                    parts.append(self.sample(part or None, n=None if part else min(self.max_batch, b - start),
                                             guidance=guidance if explicit_guidance else None, negative=neg,
                                             sampler=sampler, steps=steps, seed=seed + 1000 * k, height=height,
                                             width=width, callback=callback, keep_known=keep_known, paste=paste,
                                             precision=precision, cuda_graph=cuda_graph, prepack=prepack,
                                             compile=compile, **sampler_options))
            return torch.cat(parts)
        device = self.device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (b, self.config.latent_channels, height // f, width // f)
        x_T = torch.randn(shape, generator=generator).to(device)
        with self.stack.at_latent_size(height // f, width // f):  # channels conditioners follow the size
            model_fn: Callable[[Tensor, Tensor], Tensor]
            if self.stack.names:
                outputs = self.stack.encode(conditions, names=self.stack.names_for(conditions), device=device)
                neg = None
                if negative:
                    negative = self.check_conditions(negative)
                    neg = self.stack.encode(negative, names=self.stack.names_for(negative), device=device)
                if not outputs and not neg:  # fully unconditional: the null of every conditioner
                    outputs = {}
                    cond = self.stack.compose(self.stack.nulls(b), {n: True for n in self.stack.names})

                    def model_fn(x: Tensor, t: Tensor) -> Tensor:
                        return self.unet_call(x, t, cond)
                else:
                    scales = guidance
                    if isinstance(guidance, Mapping):
                        scales = {k: v for k, v in guidance.items()}
                        members = {k: self.stack.guided_names(k) for k in scales}
                        unknown = [k for k, m in members.items() if not m]
                        if unknown:
                            keys = ", ".join(self.stack.guidance_keys())
                            raise ValueError(
                                f"guidance for unknown conditioner(s) {', '.join(map(repr, unknown))}; "
                                f"this model has: {', '.join(self.stack.names)}"
                                + (f" (or a condition key: {keys})" if keys else "")
                            )
                        ungiven = [k for k, m in members.items() if any(c not in outputs for c in m) and scales[k] != 0]
                        if explicit_guidance and ungiven:
                            keys = {self.stack.conditioners[c].key for k in ungiven for c in members[k]}
                            raise ValueError(
                                f"guidance for {', '.join(map(repr, ungiven))}, but no value was given for the key(s) "
                                f"{', '.join(sorted(keys))} they read; give those conditions or drop their scales"
                            )
                        covered = {c for m in members.values() for c in m}
                        for name in outputs:
                            if name not in covered:
                                scales[name] = 1.0
                        scales = {k: v for k, v in scales.items() if all(c in outputs for c in members.get(k, [k]))}
                    model_fn = GuidedDenoiser(self.unet, self.stack, outputs, scales, negative_outputs=neg)
            else:
                def model_fn(x: Tensor, t: Tensor) -> Tensor:
                    return self.unet(x, t)

            if precision == "bf16":
                model_fn = _autocast(model_fn, device, torch.bfloat16)
            if cuda_graph:
                model_fn = _cuda_graphed(model_fn)
            denoise = as_eps_denoiser(model_fn, self.schedule)
            known = self._known_regions(conditions, device) if (keep_known or paste) else []
            if keep_known and known:
                denoise = self._keep_known(denoise, known, seed)
            run = get_sampler(sampler)
            with self._fast_path(prepack, compile):
                z = run(denoise, x_T, self.schedule, steps=steps, generator=generator.manual_seed(seed + 1),
                        callback=callback, **sampler_options)
        if keep_known:
            for z0, k, _, _ in known:
                z = k * z0 + (1 - k) * z
        images = self.decode_latents(z).clamp(-1, 1)
        if paste:
            for _, _, pixels, k in known:
                if pixels is not None:
                    images = k * pixels.to(images) + (1 - k) * images
        return images

    def _fast_path(self, prepack: bool, compile: bool) -> contextlib.AbstractContextManager:
        """The UNet's prepacked or compiled context for a sampling run (or none)."""
        if prepack:
            return self.unet.prepacked()
        return self.unet.compiled() if compile else contextlib.nullcontext()

    def _known_regions(self, conditions: Mapping[str, list[Any]], device: torch.device) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
        """``[(z0, known, pixels, known_pixels)]`` from every given conditioner that knows part of the result."""
        regions = []
        for name in self.stack.names_for(conditions):
            c = self.stack.conditioners[name]
            if type(c).known_latents is Conditioner.known_latents:
                continue
            with torch.no_grad():
                prepared = c.prepare(conditions[c.key], device)
                found = c.known_latents(prepared)
                pixels = c.known_pixels(prepared)
            if found is None:
                continue
            z0, k = found
            expected = (len(conditions[c.key]), 1, *c.latent_hw)
            if tuple(k.shape) != expected or z0.shape[0] != expected[0]:
                raise ValueError(f"conditioner {name!r}: known_latents returned a mask of shape {tuple(k.shape)}, "
                                 f"expected {expected}")
            regions.append((z0.to(device), k.to(device), *(pixels if pixels is not None else (None, None))))
        return regions

    def _keep_known(self, denoise: Callable[[Tensor, Tensor], Tensor], known: list, seed: int) -> Callable[[Tensor, Tensor], Tensor]:
        """The denoiser seeing, in the known region, the known latents noised to the step's level."""
        g = torch.Generator(device="cpu").manual_seed(seed + 2)
        noises = [torch.randn(z0.shape, generator=g).to(z0) for z0, _, _, _ in known]

        def blended(x: Tensor, t: Tensor) -> Tensor:
            for (z0, k, _, _), eps in zip(known, noises):
                x = k * self.schedule.q_sample(z0, t, eps) + (1 - k) * x
            return denoise(x, t)

        return blended


    #: Larger requests are sampled this many images at a time (chunk k with seed + 1000 k).
    max_batch = 256

    def estimate_sampling_bytes(self, batch: int, height: int, width: int, guided: bool = True) -> int:
        """A rough peak-memory estimate (bytes) of sampling ``batch`` images at ``height x width``.

        The terms that grow fastest: self-attention scores at the finest transformer level
        (``(B·branches)·heads·N²`` floats, N latent positions there), the UNet's feature maps, and the
        decoder's full-resolution feature maps. Coarse by design: it is for refusing requests that
        cannot fit (a 4096x4096 sample), not for budgeting."""
        f = self.config.downsample_factor
        cfg = self.config.unet
        branches = 2 if guided else 1
        b = batch * branches
        h, w = height // f, width // f
        attn = 0
        feats = 0
        for level, mult in enumerate(cfg.channel_mult):
            n = (h >> level) * (w >> level)
            feats = max(feats, 12 * b * cfg.model_channels * mult * n * 4)
            if level in cfg.attention_levels:
                attn = max(attn, b * cfg.num_heads * n * n * 4)
        decoder = 0
        if self.autoencoder is not None:
            ae = self.autoencoder.config
            decoder = 6 * batch * ae.ch * max(ae.ch_mult) * height * width * 4
        return int(attn + feats + decoder + batch * 3 * height * width * 4)

    def check_memory(self, batch: int, height: int, width: int, guided: bool = True) -> None:
        """Refuse up front (MemoryError with the estimate) what cannot fit in this machine's memory."""
        need = self.estimate_sampling_bytes(batch, height, width, guided)
        have = _available_memory(self.device)
        if need > 0.8 * have:
            raise MemoryError(
                f"sampling {batch} image(s) at {height}x{width} needs about {_gib(need)} (mostly self-attention over "
                f"{(height // self.config.downsample_factor) * (width // self.config.downsample_factor):,} latent "
                f"positions), more than this machine's {_gib(have)}; ask for a smaller size"
            )

    _SAMPLE_OPTIONS = ("n", "guidance", "negative", "sampler", "steps", "seed", "height", "width", "callback",
                       "keep_known", "paste", "precision", "prepack", "compile")

    def forward(self, conditions: Mapping[str, Sequence[Any]] | None = None, **kwargs: Any) -> list[Any]:
        """The pipeline call: ``model(label=[3, 5], guidance=2.0, steps=50, seed=0)`` → PIL images.

        Keyword arguments that are not sampling options (``n``, ``guidance``, ``negative``, ``sampler``,
        ``steps``, ``seed``, ``height``, ``width``, ``callback``) are conditions, by batch key.
        """
        from PIL import Image

        options = {k: v for k, v in kwargs.items() if k in self._SAMPLE_OPTIONS}
        conds = dict(conditions or {})
        conds.update({k: v for k, v in kwargs.items() if k not in self._SAMPLE_OPTIONS})
        images = tensor_to_images(self.sample(conds or None, **options))
        return [Image.fromarray(im) for im in images]


#: Sampling precisions: float32, or the UNet under bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")


def _autocast(fn: Callable[[Tensor, Tensor], Tensor], device: torch.device, dtype: torch.dtype) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn`` (a denoiser ``(x, t) -> prediction``) with its network under autocast; the prediction
    comes back float32, so guidance and the sampler's updates stay float32 (see UNet.forward)."""
    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return fn(x, t).float()

    return wrapped


def _cuda_graphed(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn`` (a denoiser on a CUDA device) captured in a CUDA graph at its first call and replayed after it:
    the inputs are copied into the graph's own tensors, the graph's output is cloned out. A new input
    shape captures again. If capture fails (an operation inside ``fn`` that synchronizes with the host),
    ``fn`` runs as it is from then on, after one warning."""
    state: dict[str, Any] = {}

    def capture(x: Tensor, t: Tensor) -> None:
        static_x, static_t = x.clone(), t.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture: library handles, kernel choices, lazy buffers
            for _ in range(2):
                fn(static_x, static_t)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn(static_x, static_t)
        state.update(key=(x.shape, x.dtype, t.shape, t.dtype), graph=graph, x=static_x, t=static_t, out=static_out)

    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        if state.get("failed"):
            return fn(x, t)
        if state.get("key") != (x.shape, x.dtype, t.shape, t.dtype):
            try:
                capture(x, t)
            except RuntimeError as exc:  # e.g. "operation not permitted when stream is capturing"
                warnings.warn(f"cuda_graph: capture failed ({str(exc).splitlines()[0]}); sampling without it", stacklevel=2)
                state.clear()
                state["failed"] = True
                return fn(x, t)
        state["x"].copy_(x)
        state["t"].copy_(t)
        state["graph"].replay()
        return state["out"].clone()

    return wrapped


def _available_memory(device: torch.device) -> int:
    """Total memory of the device (bytes): GPU memory for CUDA, physical RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        return 16 * 2**30


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


# -- files -------------------------------------------------------------------------------------
#: Metadata of a model file that references its zoo autoencoder instead of bundling it.
AUTOENCODER_REF_KEY = "ldmkit.autoencoder_ref"
AUTOENCODER_DIGEST_KEY = "ldmkit.autoencoder_sha256"


def save_ldm(model: LatentDiffusion, path: str | os.PathLike[str], *, dtype: Literal["float32", "float16"] = "float32",
             extra_metadata: Mapping[str, Any] | None = None, bundle_autoencoder: bool = True) -> Path:
    """One safetensors file: ``unet.*``, ``stack.*`` and ``autoencoder.*`` with both configs in the metadata.

    ``bundle_autoencoder=False`` (for a ``zoo:`` first stage only) stores a reference instead of the
    autoencoder's tensors: its zoo name and the digest of the zoo file, checked when the model is loaded
    (a smaller file; it loads only where that exact zoo autoencoder is installed).
    """
    from ldmkit.train.checkpoint import DIGEST_KEY, make_metadata, module_tensors, read_metadata, save_checkpoint

    tensors = {**module_tensors(model.unet, "unet."), **module_tensors(model.stack, "stack.")}
    extra: dict[str, Any] = dict(extra_metadata or {})
    if model.autoencoder is not None and not bundle_autoencoder:
        from ldmkit.zoo import resolve

        ref = model.config.autoencoder
        if not (isinstance(ref, str) and ref.startswith("zoo:")):
            raise ValueError(f"only a zoo autoencoder can be referenced instead of bundled; this model's is {ref!r}")
        extra[AUTOENCODER_REF_KEY] = ref
        extra[AUTOENCODER_DIGEST_KEY] = read_metadata(resolve(ref))[DIGEST_KEY]
    elif model.autoencoder is not None:
        tensors.update(module_tensors(model.autoencoder, "autoencoder."))
        extra["ldmkit.autoencoder_config"] = model.autoencoder.config.model_dump_json()
    if dtype == "float16":
        tensors = {k: (v.half() if v.is_floating_point() and "scale_factor" not in k else v) for k, v in tensors.items()}
    return save_checkpoint(path, tensors, make_metadata(CHECKPOINT_KIND, model.config, **extra))


def load_ldm(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", registry: Registry | None = None) -> LatentDiffusion:
    """Rebuild a :class:`LatentDiffusion` from :func:`save_ldm`'s file (no pickle).

    The configs are validated (and every conditioner's plugin looked up) before any tensor is read.
    """
    from pydantic import ValidationError

    from ldmkit.config import ConfigError, load_config
    from ldmkit.train.checkpoint import CheckpointError, load_checkpoint, load_module_state, metadata_config, read_metadata

    meta = read_metadata(path)
    if meta.get("ldmkit.kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a latent diffusion model: ldmkit.kind={meta.get('ldmkit.kind')!r}")
    try:
        config = load_config(metadata_config(path, meta))
    except ConfigError as exc:
        hint = "" if "more than one plugin" in str(exc) else "\n(is the plugin that provides it installed? see `ldmkit plugins`)"
        raise ConfigError(f"{path}: cannot rebuild the model: {exc}{hint}") from None
    autoencoder = None
    if AUTOENCODER_REF_KEY in meta:  # a reference to a zoo autoencoder, checked by digest
        from ldmkit.models.autoencoder import load_autoencoder
        from ldmkit.train.checkpoint import DIGEST_KEY
        from ldmkit.zoo import resolve

        ref = meta[AUTOENCODER_REF_KEY]
        ae_path = resolve(ref)
        if read_metadata(ae_path).get(DIGEST_KEY) != meta.get(AUTOENCODER_DIGEST_KEY):
            raise CheckpointError(f"{path} was saved with the autoencoder {ref} of digest "
                                  f"{meta.get(AUTOENCODER_DIGEST_KEY)}, but {ae_path} holds another one; "
                                  "this model needs the autoencoder it was trained with")
        autoencoder = load_autoencoder(ae_path).freeze()
    elif "ldmkit.autoencoder_config" in meta:
        try:
            ae_config = AutoencoderConfig.model_validate(metadata_config(path, meta, "ldmkit.autoencoder_config"))
        except ValidationError as exc:
            raise CheckpointError(f"{path} holds an invalid autoencoder config: {exc}") from None
        autoencoder = Autoencoder(ae_config)
    model = LatentDiffusion(config, autoencoder, registry or get_registry())
    state = load_checkpoint(path).tensors
    groups: dict[str, dict[str, Tensor]] = {"unet": {}, "stack": {}, "autoencoder": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in groups:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        groups[head][rest] = value.float() if value.is_floating_point() else value
    for name, group in groups.items():  # checked before the float16 -> float32 upcast below hides an int tensor
        bad = [k for k, v in group.items() if not v.is_floating_point() and k.endswith(("weight", "bias"))]
        if bad:
            raise CheckpointError(f"{path}: {name}.{bad[0]} is not floating point")
    load_module_state(model.unet, groups["unet"], f"{path} (unet)")
    load_module_state(model.stack, groups["stack"], f"{path} (conditioning stack)")
    if autoencoder is not None and AUTOENCODER_REF_KEY not in meta:
        load_module_state(autoencoder, groups["autoencoder"], f"{path} (autoencoder)")
    elif groups["autoencoder"]:
        raise CheckpointError(f"{path} both references and bundles an autoencoder")
    return model.to(device).eval()
