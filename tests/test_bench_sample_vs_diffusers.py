"""benchmarks/sample_vs_diffusers.py: its weight mapping makes diffusers' UNet compute ldmkit's, and its
DDIMScheduler visits ldmkit's DDIM timesteps (zoo:shapes-class)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from sample_vs_diffusers import (  # noqa: E402
    build_diffusers_unet,
    build_scheduler,
    compare_schedules,
    copy_unet_weights,
    unet_max_abs_diff,
    unet_name_map,
)


@pytest.fixture(scope="module")
def model():
    import ldmkit

    return ldmkit.load("zoo:shapes-class")


def test_unets_agree(model):
    dunet = build_diffusers_unet(model.unet)
    mapping = copy_unet_weights(model.unet, dunet)
    assert set(mapping) == {n for n, _ in model.unet.named_parameters()}
    assert sorted(mapping.values()) == sorted(n for n, _ in dunet.named_parameters())
    assert unet_max_abs_diff(model.unet, dunet, batch=3, seed=1) < 1e-4


def test_copy_refuses_a_left_over_parameter(model):
    dunet = build_diffusers_unet(model.unet)
    dunet.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="left unassigned"):
        copy_unet_weights(model.unet, dunet)
    assert len(unet_name_map(model.unet)) == sum(1 for _ in model.unet.parameters())


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_timesteps_match(model, steps):
    cmp = compare_schedules(model.schedule, build_scheduler(model.schedule), steps)
    assert cmp["timesteps_match"] and cmp["prev_timesteps_match"]
    assert cmp["final_alpha_ldmkit"] == pytest.approx(cmp["final_alpha_diffusers"], abs=1e-7)
    assert cmp["alphas_cumprod_max_abs_diff"] < 1e-5
