"""Inpainting conditioning (LDM paper §4.5): the masked image, encoded by the first stage, plus the mask.

**Field.** The conditioner reads the plugin-declared field ``inpaint`` (:data:`INPAINT`), one value per
sample::

    {"image": H x W x 3 uint8 RGB (integers 0..255), "mask": H x W bool, True = unknown (to be filled)}

``derive`` builds it from any sample with an ``image`` and a ``mask`` (every shapes-world sample), so
``ldmkit train`` and ``ldmkit eval --suite shapes-inpaint`` need no data preparation. Arrays may also be
torch tensors or nested lists (JSON), and the mask may be 0/1 integers or floats. On the command line
give a JSON file (``--cond inpaint=@inpaint.json``) or, as a convenience, file paths:
``--cond inpaint='{"image": "photo.png", "mask": "mask.png"}'`` (the image is read as RGB; mask pixels
brighter than 127 are unknown). Pixels of ``image`` under the mask are ignored.

**Size.** ``H x W = latent_hw x downsample_factor``: the size of the image being generated now (32x32 for
the shapes models, 64x64 when sampling them at 2x).

**Output** (channels route, ``latent_channels + 1`` channels, as the paper's inpainting model): the
masked image — unknown pixels set to 0, i.e. mid-grey in [-1, 1] — encoded by the frozen first stage
(``context.encode_image``, scaled latents), and the mask area-averaged to the latent size (the fraction
of each latent pixel that is unknown). The conditioner has no learned weights.

``context.encode_image`` is None when no model is attached (a bare ``ConditionerContext``): in pixel
space (``downsample_factor`` 1, 3 latent channels, where ``LatentDiffusion`` passes no encoder) the
image itself is used; otherwise encoding raises a RuntimeError saying so. Building never needs the
encoder (``ldmkit wiring`` works).

**Null**: a zero latent and an all-unknown mask plane (``1``), at ``latent_hw``: "nothing is known".

**Keeping the known region**: the core's sampling holds what :meth:`InpaintConditioner.known_latents`
returns (the known latents, noised to each step's level, replace the model's input there; the final
latents take them) and, with ``paste=True``, pastes :meth:`InpaintConditioner.known_pixels` over the
decoded image.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PlainValidator, WithJsonSchema

from ldmkit import (
    ConditionField,
    Conditioner,
    ConditionerConfig,
    ConditionerContext,
    ConditionerSpec,
    ConditionInputError,
    ConditionOutput,
    Route,
    Sample,
    as_array,
    hookimpl,
)

__all__ = ["INPAINT", "InpaintConfig", "InpaintConditioner", "SPEC", "ldmkit_conditioners", "inpaint_value"]

def _allowed(size: tuple[int, int] | None = None) -> str:
    where = f" (H x W = {size[0]} x {size[1]} now)" if size else ""
    return ('{"image": an H x W x 3 uint8 RGB image (integers 0..255), "mask": an H x W bool mask, True = unknown}'
            f"{where}; arrays, tensors, nested lists or image file paths")


def _check_structure(value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping with 'image' and 'mask', got {type(value).__name__}")
    keys = set(value)
    if keys != {"image", "mask"}:
        missing, extra = sorted({"image", "mask"} - keys), sorted(str(k) for k in keys - {"image", "mask"})
        raise ValueError("; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                   + ([f"unknown key(s) {', '.join(extra)}"] if extra else [])))
    return dict(value)


def inpaint_value(sample: Sample) -> dict[str, np.ndarray] | None:
    """The ``inpaint`` field of a sample: its image and mask (None when it has no mask)."""
    if sample.mask is None:
        return None
    return {"image": sample.image, "mask": sample.mask}


#: The field this plugin introduces. Values are checked for shape and content by the conditioner.
INPAINT = ConditionField(
    name="inpaint",
    value_type=Annotated[
        Any,
        PlainValidator(_check_structure),
        WithJsonSchema({
            "type": "object",
            "properties": {
                "image": {"description": "H x W x 3 RGB, integers 0..255 (nested lists), or an image file path",
                          "anyOf": [{"type": "array", "items": {"type": "array", "items": {
                              "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                              "minItems": 3, "maxItems": 3}}}, {"type": "string"}]},
                "mask": {"description": "H x W, true/1 = unknown (to be filled), or a mask image path "
                                        "(pixels > 127 unknown)",
                         "anyOf": [{"type": "array", "items": {"type": "array", "items": {
                             "anyOf": [{"type": "boolean"}, {"enum": [0, 1]}]}}}, {"type": "string"}]},
            },
            "required": ["image", "mask"],
            "additionalProperties": False,
        }),
    ],
    derive=inpaint_value,
    description="image + mask (True = unknown) for inpainting",
)


class InpaintConfig(ConditionerConfig):
    """Config of the ``inpaint`` conditioner (it has no learned weights)."""

    type: Literal["inpaint"] = "inpaint"
    key: str = "inpaint"



def _read_file(path: str, what: str, key: str, index: int | None, allowed: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ConditionInputError(key, f"{what}: no such file {path!r}", allowed, index)
    try:
        with Image.open(p) as im:
            if what == "image":
                return np.asarray(im.convert("RGB"))
            return np.asarray(im.convert("L")) > 127
    except (UnidentifiedImageError, OSError) as exc:
        raise ConditionInputError(key, f"{what}: {path!r} is not a readable image ({exc})", allowed, index) from None


def parse_value(value: Any, key: str, index: int | None, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One sample's value → ``(H x W x 3 uint8 image, H x W bool mask)``; ConditionInputError otherwise."""
    allowed = _allowed(size)
    try:
        value = _check_structure(value)
    except ValueError as exc:
        raise ConditionInputError(key, str(exc), allowed, index) from None
    parts = {}
    for what in ("image", "mask"):
        raw = value[what]
        arr = _read_file(raw, what, key, index, allowed) if isinstance(raw, str) else as_array(raw)
        if arr is None:
            kind = "ragged or mixed nested lists" if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise ConditionInputError(key, f"{what}: expected an array, got {kind}", allowed, index)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ConditionInputError(key, f"{what} contains NaN or inf", allowed, index)
        parts[what] = arr
    image, mask = parts["image"], parts["mask"]
    if image.ndim != 3 or image.shape[-1] != 3:
        extra = " (RGBA: drop the alpha channel)" if image.ndim == 3 and image.shape[-1] == 4 else ""
        raise ConditionInputError(key, f"image: expected H x W x 3 (RGB), got shape {tuple(image.shape)}{extra}",
                                  allowed, index)
    if image.dtype.kind not in "iu":
        raise ConditionInputError(key, f"image: pixel values must be integers 0..255, got dtype {image.dtype}",
                                  allowed, index)
    if image.size and (int(image.min()) < 0 or int(image.max()) > 255):
        raise ConditionInputError(key, f"image: pixel values span {int(image.min())}..{int(image.max())}, "
                                       "outside 0..255", allowed, index)
    if mask.ndim != 2:
        raise ConditionInputError(key, f"mask: expected H x W, got shape {tuple(mask.shape)}", allowed, index)
    if mask.dtype.kind not in "biuf":
        raise ConditionInputError(key, f"mask: expected bool or 0/1 values, got dtype {mask.dtype}", allowed, index)
    if mask.dtype.kind != "b":
        if not np.isin(mask, (0, 1)).all():
            bad = mask[~np.isin(mask, (0, 1))].flat[0].item()
            raise ConditionInputError(key, f"mask is not binary (found {bad!r}); True/1 = unknown, False/0 = known",
                                      allowed, index)
        mask = mask == 1
    if tuple(mask.shape) != tuple(image.shape[:2]):
        raise ConditionInputError(key, f"mask is {mask.shape[0]} x {mask.shape[1]} but the image is "
                                       f"{image.shape[0]} x {image.shape[1]}", allowed, index)
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        raise ConditionInputError(key, f"the image is {image.shape[0]} x {image.shape[1]}, but the model works at "
                                       f"{size[0]} x {size[1]} pixels now (the image size being generated)",
                                  allowed, index)
    return np.ascontiguousarray(image, dtype=np.uint8), np.ascontiguousarray(mask, dtype=bool)


class InpaintConditioner(Conditioner):
    """``{image, mask}`` → ``[first_stage(masked image), mask at latent size]``: ``(B, latent_channels + 1, h, w)``."""

    route = Route.CHANNELS

    def __init__(self, config: InpaintConfig, context: ConditionerContext | None):
        super().__init__(config, context or ConditionerContext())
        self.factor = self.context.downsample_factor
        self.latent_channels = self.context.latent_channels
        self.output_dim = self.latent_channels + 1
        # no weights: a buffer tells null() the module's device and dtype
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @property
    def image_size(self) -> tuple[int, int]:
        """The ``(H, W)`` the image and mask must have now: the latent size times the downsampling factor."""
        h, w = self.latent_hw
        return h * self.factor, w * self.factor

    # -- input ---------------------------------------------------------------------------------
    def validate_one(self, value: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
        return parse_value(value, self.key, index, self.image_size)

    def collate(self, values: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(np.stack([v[0] for v in values])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        masks = torch.from_numpy(np.stack([v[1] for v in values]))[:, None].float()
        return {"image": images.to(device), "mask": masks.to(device)}

    # -- output --------------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        encode = self.context.encode_image
        if encode is None:
            if self.factor == 1 and self.latent_channels == 3:
                return images  # pixel space: the "first stage" is the identity
            raise RuntimeError(
                "the inpaint conditioner encodes the masked image with the model's first stage "
                "(ConditionerContext.encode_image), but none is attached: use it inside a LatentDiffusion model "
                "(ldmkit.load, ldmkit train), or build it with ConditionerContext(encode_image=...)")
        z = encode(images)
        want = (images.shape[0], self.latent_channels, *self.latent_hw)
        if tuple(z.shape) != want:
            raise RuntimeError(f"inpaint: the first stage encoded {tuple(images.shape)} images to {tuple(z.shape)}, "
                               f"expected {want} (latent_channels and the latent size of the model)")
        return z

    def forward(self, inputs: dict[str, torch.Tensor]) -> ConditionOutput:
        image, mask = inputs["image"], inputs["mask"]
        z = self._encode(image * (1.0 - mask))  # unknown pixels -> 0 (mid-grey)
        m = F.interpolate(mask, size=self.latent_hw, mode="area")  # fraction unknown per latent pixel
        return ConditionOutput(Route.CHANNELS, torch.cat([z.to(m.dtype), m], dim=1).to(self.anchor.dtype))

    def null(self, batch_size: int) -> ConditionOutput:
        h, w = self.latent_hw
        out = torch.zeros(batch_size, self.output_dim, h, w, device=self.anchor.device, dtype=self.anchor.dtype)
        out[:, -1] = 1.0  # everything unknown
        return ConditionOutput(Route.CHANNELS, out)

    # -- for a sampler that keeps the known region (not called by the core yet) -----------------
    def known_latents(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z0, known)`` for prepared inputs (:meth:`prepare`): the latents of the masked image
        ``(B, latent_channels, h, w)`` and ``(B, 1, h, w)`` = 1 where the latent pixel lies wholly in the
        known region, else 0. A sampler keeps them by setting, after each step to time ``t``,
        ``x_t = known * q_sample(z0, t) + (1 - known) * x_t``."""
        z = self._encode(inputs["image"] * (1.0 - inputs["mask"]))
        known = (F.interpolate(inputs["mask"], size=self.latent_hw, mode="area") == 0).to(z.dtype)
        return z, known

    def known_pixels(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, known)`` for prepared inputs: the image in [-1, 1] ``(B, 3, H, W)`` and ``(B, 1, H, W)``
        = 1 where known, for pasting the known pixels over the decoded result."""
        return inputs["image"], 1.0 - inputs["mask"]


def _example(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    x0, y0 = (int(v) for v in rng.integers(0, 16, size=2))
    mask[y0:y0 + 12, x0:x0 + 14] = True
    return {"image": image, "mask": mask}


SPEC = ConditionerSpec(
    name="inpaint",
    config_cls=InpaintConfig,
    build=InpaintConditioner,
    route=Route.CHANNELS,
    description="masked image (first-stage latents) + mask -> latent_channels + 1 channels",
    example_inputs=(_example(0), _example(1), _example(2)),
    fields=(INPAINT,),
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
