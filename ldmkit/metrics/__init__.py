"""Metrics: image-level (PSNR, SSIM, Fréchet distance) and per-modality fidelity on the shapes world.

Per-modality metrics parse generated images back into objects (:func:`parse_scene`) and compare them with
the conditions; ``docs/evaluation.md`` defines each one. The ``fd`` feature network (torch) lives in
:mod:`ldmkit.metrics.features` and is imported only when ``fd`` is computed.
"""

from ldmkit.metrics.image import PSNR_CAP, bicubic_upsample, fd, frechet_distance, psnr, psnr_image, ssim, ssim_image
from ldmkit.metrics.shapes import (
    ParsedObject, SceneParse, box_iou, caption_acc, class_acc, is_clean, layout_scores, object_f1, inpaint_object_f1, parse_scene,
    parse_scene_details, scene_faults, semantic_map, semantic_scores, valid_scene_faults, valid_scene_rate,
)

__all__ = [
    "PSNR_CAP", "bicubic_upsample", "fd", "frechet_distance", "psnr", "psnr_image", "ssim", "ssim_image",
    "ParsedObject", "SceneParse", "box_iou", "caption_acc", "class_acc", "is_clean", "layout_scores", "object_f1", "inpaint_object_f1",
    "parse_scene", "parse_scene_details", "scene_faults", "semantic_map", "semantic_scores", "valid_scene_faults",
    "valid_scene_rate",
]
