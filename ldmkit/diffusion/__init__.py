"""The diffusion process: noise schedules and parameterizations, samplers, classifier-free guidance.

See ``docs/diffusion.md``. Samplers are plain functions sharing one signature
(``sampler(denoise, x, schedule, *, steps, generator=None, callback=None, **opts)``) and are looked
up by name with :func:`get_sampler`.
"""

from ldmkit.diffusion.guidance import GuidedDenoiser, concat_stack_outputs
from ldmkit.diffusion.samplers import (
    SAMPLERS,
    as_eps_denoiser,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
    sampler_timesteps,
    spaced_timesteps,
)
from ldmkit.diffusion.schedule import PARAMETERIZATIONS, NoiseSchedule, cosine_betas, scaled_linear_betas

__all__ = [
    "GuidedDenoiser",
    "NoiseSchedule",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "as_eps_denoiser",
    "concat_stack_outputs",
    "cosine_betas",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_plms",
    "sampler_timesteps",
    "scaled_linear_betas",
    "spaced_timesteps",
]
