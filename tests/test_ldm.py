"""Latent diffusion: training (exact resume, DDP equals one process), files, sampling and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder
from ldmkit.models.ldm import LatentDiffusion, load_ldm, save_ldm
from ldmkit.train.checkpoint import CheckpointError, load_checkpoint
from ldmkit.train.diffusion import DiffusionTrainConfig, export_model, train_diffusion

TINY_AE = dict(kind="kl", resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
               z_channels=3, embed_dim=3, norm_groups=4)


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_autoencoder(Autoencoder(AutoencoderConfig(**TINY_AE)), path)
    return path


def train_cfg(ae_path, out_dir, **overrides):
    data = {
        "model": {
            "image_size": 32, "autoencoder": str(ae_path), "latent_channels": 3, "downsample_factor": 4,
            "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "num_heads": 2},
            "conditioning": {"context_dim": 16, "vector_dim": 16, "conditioners": [
                {"type": "class", "key": "label", "num_classes": 18, "dim": 16, "dropout": 0.3},
                {"type": "class", "name": "class_vec", "key": "label", "num_classes": 18, "dim": 16, "route": "vector", "dropout": 0.3},
            ]},
        },
        "data": {"name": "shapes", "cache_size": 64},
        "steps": 6, "batch_size": 8, "warmup_steps": 2, "log_every": 2, "image_every": 1000, "ckpt_every": 3,
        "out_dir": str(out_dir), "num_threads": 1,
    }
    data.update(overrides)
    return load_config(data, DiffusionTrainConfig)


def trainable(path):
    ckpt = load_checkpoint(path)
    return {k: v for k, v in ckpt.tensors.items() if k.startswith(("model.", "ema."))}


def test_training_reduces_loss_and_writes_everything(ae_path, tmp_path):
    logs = []
    cfg = train_cfg(ae_path, tmp_path / "run", steps=30, log_every=10, lr=2e-3, image_every=30, num_images=4, sample_steps=3)
    final = train_diffusion(cfg, progress=False, on_step=lambda s, rec: logs.append(rec["loss"]))
    assert final.is_file() and (tmp_path / "run/samples/step_000030.png").is_file()
    assert logs[-1] < logs[0]
    lines = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "done"


@pytest.mark.parametrize("fused", [False, True])
def test_resume_reproduces_the_uninterrupted_run(ae_path, tmp_path, fused):
    full = train_cfg(ae_path, tmp_path / "full", fused_optimizer=fused)
    train_diffusion(full, progress=False)
    part = train_cfg(ae_path, tmp_path / "part", fused_optimizer=fused)
    train_diffusion(part, progress=False, stop_after=3)  # as if killed after the step-3 checkpoint
    assert not (tmp_path / "part/model.safetensors").exists()
    train_diffusion(part, resume=True, progress=False)
    a, b = trainable(tmp_path / "full/last.safetensors"), trainable(tmp_path / "part/last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # exporting the last checkpoint gives the final model file's weights, with a chosen default guidance
    exported = load_ldm(export_model(tmp_path / "part/last.safetensors", tmp_path / "exp.safetensors", guidance=2.5))
    final = load_ldm(tmp_path / "full/model.safetensors")
    assert exported.config.guidance == 2.5 and final.config.guidance == 1.0
    for (k, v), w in zip(final.unet.state_dict().items(), exported.unet.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(CheckpointError, match="not a diffusion training checkpoint"):
        export_model(tmp_path / "full/model.safetensors", tmp_path / "bad.safetensors")


def test_refuses_to_overwrite_or_resume_a_different_recipe(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "r", steps=3)
    train_diffusion(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_diffusion(cfg, progress=False)
    with pytest.raises(ValueError, match="differs in \\['batch_size'\\]"):
        train_diffusion(train_cfg(ae_path, tmp_path / "r", steps=3, batch_size=4), resume=True, progress=False)
    with pytest.raises(ValueError, match="changes steps already taken"):
        train_diffusion(train_cfg(ae_path, tmp_path / "r", steps=3, lr=1e-2), resume=True, progress=False)


def test_lr_scale_gives_each_part_its_own_group_and_rate(ae_path, tmp_path):
    from ldmkit.models.autoencoder import load_autoencoder
    from ldmkit.train.checkpoint import unflatten_optimizer_state
    from ldmkit.train.diffusion import parameter_groups

    cfg = train_cfg(ae_path, tmp_path / "s", steps=4, lr=1e-3, lr_scale={"class": 0.01})
    model = LatentDiffusion(cfg.model, load_autoencoder(ae_path))
    groups, scales = parameter_groups(model, cfg.lr_scale)
    assert scales == [1.0, 0.01, 1.0]  # unet, class, class_vec (stack order)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.trainable_parameters())  # each trainable weight once
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.stack.conditioners["class"].parameters()}
    assert [len(g["params"]) for g in parameter_groups(model, {})[0]] == [len(ids)]  # no factors: one group

    train_diffusion(cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "s/last.safetensors")
    lrs = [g["lr"] for g in unflatten_optimizer_state(ckpt.tensors, ckpt.metadata, "opt")["param_groups"]]
    assert lrs[1] == pytest.approx(0.01 * lrs[0]) and lrs[2] == pytest.approx(lrs[0]) and lrs[0] > 0
    # the slowed conditioner moved ~100x less than its unscaled twin run's (Adam steps scale with lr)
    train_diffusion(train_cfg(ae_path, tmp_path / "p", steps=4, lr=1e-3), progress=False)
    torch.manual_seed(cfg.seed)  # the trainer's initial weights: the same seed, then the same constructions
    start = LatentDiffusion(cfg.model, load_autoencoder(ae_path))
    key = next(k for k in trainable(tmp_path / "s/last.safetensors") if k.startswith("model.stack.conditioners.class."))
    init = dict(start.named_parameters())[key.removeprefix("model.")].detach()
    moved = {run: float((trainable(tmp_path / f"{run}/last.safetensors")[key].float() - init).abs().max()) for run in "sp"}
    assert 0 < moved["s"] < 0.05 * moved["p"], moved
    # resuming keeps the groups and their rates: exactly the uninterrupted run
    part = train_cfg(ae_path, tmp_path / "part", steps=4, lr=1e-3, lr_scale={"class": 0.01})
    train_diffusion(part, progress=False, stop_after=3)
    train_diffusion(part, resume=True, progress=False)
    a, b = trainable(tmp_path / "s/last.safetensors"), trainable(tmp_path / "part/last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="differs in \\['lr_scale'\\]"):
        train_diffusion(train_cfg(ae_path, tmp_path / "part", steps=5, lr=1e-3), resume=True, progress=False)


def test_init_from_warm_starts_the_shared_parts_and_keeps_an_added_conditioner_fresh(ae_path, tmp_path):
    from ldmkit.models.autoencoder import load_autoencoder
    from ldmkit.train.diffusion import warm_start

    base = train_diffusion(train_cfg(ae_path, tmp_path / "base", steps=3, lr=1e-2), progress=False)
    saved = load_checkpoint(base).tensors
    grown = train_cfg(ae_path, tmp_path / "grown", steps=2, lr=1e-9, init_from=str(base))
    extra = {"type": "class", "name": "class_extra", "key": "label", "num_classes": 18, "dim": 16, "dropout": 0.3}
    model_cfg = grown.model.model_dump()
    model_cfg["conditioning"]["conditioners"].append(extra)
    grown = grown.model_copy(update={"model": load_config(model_cfg, type(grown.model))})
    torch.manual_seed(1)
    model = LatentDiffusion(grown.model, load_autoencoder(ae_path))
    fresh = {k: v.clone() for k, v in model.stack.conditioners["class_extra"].state_dict().items()}
    report = warm_start(model, str(base))
    assert report["kept"] == ["class_extra"] and report["loaded"] < report["of"]
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, saved["unet." + k].float()), k
    assert torch.equal(model.stack.conditioners["class"].embedding.weight, saved["stack.conditioners.class.embedding.weight"])
    assert all(torch.equal(v, fresh[k]) for k, v in model.stack.conditioners["class_extra"].state_dict().items())
    # in the trainer: logged, and the EMA starts from the loaded weights (a ~0 learning rate keeps them)
    final = train_diffusion(grown, progress=False, stop_after=1)
    log = [json.loads(x) for x in (tmp_path / "grown/log.jsonl").read_text().splitlines()]
    assert log[1]["event"] == "init_from" and log[1]["kept"] == ["class_extra"]
    base.rename(tmp_path / "moved.safetensors")  # a resume reads only its checkpoint, not init_from
    final = train_diffusion(grown, resume=True, progress=False)
    ema = load_checkpoint(final).tensors
    assert torch.allclose(ema["unet.out.2.weight"].float(), saved["unet.out.2.weight"].float(), atol=1e-6)


def test_init_from_refuses_another_shape_or_a_file_that_is_no_ldm(ae_path, tmp_path):
    from ldmkit.models.autoencoder import load_autoencoder
    from ldmkit.train.diffusion import warm_start
    from ldmkit.zoo import ZooError

    base = train_diffusion(train_cfg(ae_path, tmp_path / "base", steps=1), progress=False)
    wide = train_cfg(ae_path, tmp_path / "wide").model.model_dump()
    wide["unet"]["model_channels"] = 24
    model = LatentDiffusion(load_config(wide, type(train_cfg(ae_path, tmp_path).model)), load_autoencoder(ae_path))
    with pytest.raises(CheckpointError, match=r"another shape than this recipe's: unet\.\S+ \(16,"):
        warm_start(model, str(base))
    with pytest.raises(CheckpointError, match="is not a latent diffusion model"):
        warm_start(model, str(ae_path))
    with pytest.raises(ZooError, match="init_from: model .*missing.safetensors' is not a file"):
        warm_start(model, str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("scale,match", [({"text": 0.1}, "'text' is not a part of this model; allowed: unet, class, class_vec"),
                                         ({"class": 0.0}, "lr_scale.class: must be a positive finite number"),
                                         ({"unet": float("nan")}, "lr_scale.unet: must be a positive")])
def test_lr_scale_refuses_unknown_parts_and_bad_factors(ae_path, tmp_path, scale, match):
    with pytest.raises(ValueError, match=match):
        train_cfg(ae_path, tmp_path, lr_scale=scale)


def test_a_decay_tail_added_on_resume_equals_the_recipe_trained_in_one_go(ae_path, tmp_path):
    """A constant-rate run may be given a cosine tail from a step it has not taken yet; the result is
    exactly the run whose recipe had that schedule from the start, so the recipe stays reproducible."""
    tail = dict(lr_schedule="cosine", decay_start=3, final_lr_fraction=0.1)
    train_diffusion(train_cfg(ae_path, tmp_path / "once", **tail), progress=False)
    train_diffusion(train_cfg(ae_path, tmp_path / "two", steps=3), progress=False)
    with pytest.raises(ValueError, match="start the decay \\(decay_start\\) at 3 or later"):
        train_diffusion(train_cfg(ae_path, tmp_path / "two", **{**tail, "decay_start": 2}), resume=True, progress=False)
    train_diffusion(train_cfg(ae_path, tmp_path / "two", **tail), resume=True, progress=False)
    a, b = trainable(tmp_path / "once/last.safetensors"), trainable(tmp_path / "two/last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "once/log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[1] == pytest.approx(3e-4) and 3e-5 < lrs[-1] < 2.9e-4  # held until step 3, then decaying to 0.1 * lr


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(ae_path, tmp_path):
    single = train_cfg(ae_path, tmp_path / "single", steps=4, ckpt_every=4)
    held = {}
    train_diffusion(single, progress=False,
                    on_done=lambda m: held.update(w=torch.cat([p.detach().flatten() for p in m.trainable_parameters()])))
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(train_cfg(ae_path, tmp_path / "ddp", steps=4, ckpt_every=4).model_dump_json())
    script = tmp_path / "run_ddp.py"
    script.write_text(
        "import sys, torch\n"
        "import torch.distributed as dist\n"
        "from ldmkit.train.diffusion import DiffusionTrainConfig, export_model, train_diffusion\n"
        "cfg = DiffusionTrainConfig.model_validate_json(open(sys.argv[1]).read())\n"
        "def dump(model):\n"  # every rank writes the weights it holds in memory
        "    w = torch.cat([p.detach().flatten() for p in model.trainable_parameters()])\n"
        "    torch.save(w, cfg.out_dir + f'/rank{dist.get_rank()}.pt')\n"  # a plain tensor file for the test only
        "train_diffusion(cfg, progress=False, on_done=dump)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          str(script), str(cfg_path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp/rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp/rank1.pt", weights_only=True)
    assert torch.equal(r0, r1)  # the ranks hold identical weights
    w = held["w"]
    assert r0.shape == w.shape and not torch.equal(w, torch.zeros_like(w))
    assert torch.allclose(r0, w, atol=1e-5, rtol=1e-4), (r0 - w).abs().max()
    # the documented command: torchrun -m ldmkit.cli train RECIPE.yaml
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(json.loads(train_cfg(ae_path, tmp_path / "cli", steps=4, ckpt_every=4).model_dump_json())))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
                          "-m", "ldmkit.cli", "train", str(recipe), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_ldm(tmp_path / "cli/model.safetensors"), load_ldm(tmp_path / "single/model.safetensors")
    for (k, v), u in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.allclose(v, u, atol=1e-5, rtol=1e-4), k


def perturbed_model(cfg) -> LatentDiffusion:
    """A model of ``cfg`` (seed 0, tiny autoencoder) whose UNet weights are nudged off their initialization:
    an untrained UNet's zero-initialized output ignores every condition."""
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE)))
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_file_roundtrip_and_sampling(ae_path, tmp_path):
    model = perturbed_model(train_cfg(ae_path, tmp_path / "x").model)
    path = save_ldm(model, tmp_path / "m.safetensors")
    again = load_ldm(path)
    a = model.eval().sample({"label": [1, 2]}, steps=3, seed=5)
    b = again.sample({"label": [1, 2]}, steps=3, seed=5)
    assert a.shape == (2, 3, 32, 32) and torch.allclose(a, b, atol=1e-5)
    c = again.sample({"label": [1, 2]}, steps=3, seed=5, guidance={"class": 3.0, "class_vec": 0.0})
    assert not torch.allclose(a, c)
    # the model's default guidance (config.guidance) is used when the caller gives none, and is saved
    model.config.guidance = {"class": 3.0, "class_vec": 0.0}
    d = load_ldm(save_ldm(model, tmp_path / "g.safetensors")).sample({"label": [1, 2]}, steps=3, seed=5)
    assert torch.allclose(c, d, atol=1e-5)
    big = again.sample({"label": [1]}, steps=2, seed=0, height=64, width=64)  # convolutional sampling
    assert big.shape == (1, 3, 64, 64)
    # bf16 autocast: float32 images close to the float32 run, not identical
    e = again.sample({"label": [1, 2]}, steps=3, seed=5, precision="bf16")
    assert e.dtype == torch.float32 and not torch.equal(a, e) and (a - e).abs().mean() < 0.02
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        again.sample({"label": [1]}, steps=2, precision="fp16")
    with pytest.raises(ValueError, match="accepts: label"):
        again.sample({"caption": ["a red circle"]}, steps=2)


def test_cuda_graph_is_refused_off_cuda_and_gives_the_plain_images_on_it(ae_path, tmp_path):
    path = save_ldm(perturbed_model(train_cfg(ae_path, tmp_path / "x").model), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device; this one is on cpu"):
        load_ldm(path).sample({"label": [1]}, steps=2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be true or false"):
        load_ldm(path).sample({"label": [1]}, steps=2, cuda_graph="yes")
    if not torch.cuda.is_available():
        return  # the capture itself needs a GPU: on one, this test runs it (and scripts/gpu_smoke.py checks it too)
    gpu = load_ldm(path, device="cuda")
    for sampler in ("ddim", "dpmpp_2m"):
        plain = gpu.sample({"label": [1, 2, 3]}, sampler=sampler, steps=4, seed=5)
        graphed = gpu.sample({"label": [1, 2, 3]}, sampler=sampler, steps=4, seed=5, cuda_graph=True)
        assert graphed.is_cuda and torch.allclose(plain, graphed, atol=1e-5), sampler
    # chunks of another batch size capture again; per-conditioner guidance has more branches
    gpu.max_batch = 2
    plain = gpu.sample({"label": [1, 2, 3]}, steps=3, seed=1, guidance={"class": 3.0, "class_vec": 1.0})
    graphed = gpu.sample({"label": [1, 2, 3]}, steps=3, seed=1, guidance={"class": 3.0, "class_vec": 1.0}, cuda_graph=True)
    assert torch.allclose(plain, graphed, atol=1e-5)


def test_prepack_gives_the_plain_images_up_to_rounding_and_is_refused_off_the_cpu(ae_path, tmp_path, monkeypatch):
    model = load_ldm(save_ldm(perturbed_model(train_cfg(ae_path, tmp_path / "x").model), tmp_path / "m.safetensors"))
    for kwargs in ({}, {"guidance": {"class": 3.0, "class_vec": 1.0}}, {"sampler": "dpmpp_2m"}, {"precision": "bf16"}):
        plain = model.sample({"label": [1, 2, 3]}, steps=3, seed=5, **kwargs)
        packed = model.sample({"label": [1, 2, 3]}, steps=3, seed=5, prepack=True, **kwargs)
        tol = 0.05 if kwargs.get("precision") == "bf16" else 2e-3
        assert (plain - packed).abs().mean() < tol / 10 and (plain - packed).abs().max() < tol * 10, kwargs
    model.max_batch = 2  # chunks of 2 and 1: a new context each, so keys and values are computed anew
    plain = model.sample({"label": [1, 2, 3]}, steps=2, seed=1)
    assert (plain - model.sample({"label": [1, 2, 3]}, steps=2, seed=1, prepack=True)).abs().max() < 2e-3
    with pytest.raises(ValueError, match="prepack must be true or false"):
        model.sample({"label": [1]}, steps=2, prepack="yes")
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ValueError, match="prepack=True is for a model on the CPU; this one is on cuda"):
        model.sample({"label": [1]}, steps=2, prepack=True)


@pytest.mark.slow
def test_compile_gives_the_plain_images_up_to_rounding_recompiles_for_new_weights_and_falls_back(ae_path, tmp_path, monkeypatch):
    """sample(compile=True) really compiles (inductor, weights frozen) and gives the plain images up to
    rounding; a second run reuses the compiled code; weights changed in place are not served stale; a failed
    compile warns and samples on the plain path; bad values are refused by name. At 16 x 16 pixels the
    latent is 4 x 4, so the UNet's deepest level is 2 x 2: its 3x3 convolutions run as matrix products."""
    from torch._dynamo.utils import counters

    from ldmkit.models.compiled import compiled_state

    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731 - graphs dynamo has compiled in this process
    model = load_ldm(save_ldm(perturbed_model(train_cfg(ae_path, tmp_path / "x").model), tmp_path / "m.safetensors"))
    size = dict(height=16, width=16, steps=3, seed=5)
    plain = model.sample({"label": [1, 2, 3]}, **size)
    before = graphs()
    fast = model.sample({"label": [1, 2, 3]}, compile=True, **size)
    state = compiled_state(model.unet)
    assert state.failed is None and graphs() == before + 1 and len(state.shapes) == 1  # one graph, no fallback
    assert (plain - fast).abs().max() < 2e-3 and (plain - fast).abs().mean() < 2e-4
    small = [n for n, _ in model.unet.named_buffers() if "small_weight_2x2" in n]
    assert small and not any("small_" in k for k in model.unet.state_dict())  # derived, never saved
    assert torch.equal(fast, model.sample({"label": [1, 2, 3]}, compile=True, **size))
    assert graphs() == before + 1  # the same shapes and weights: nothing compiled again
    two = model.sample({"label": [1, 2]}, compile=True, **size)  # another batch: compiled for it ...
    assert (two - model.sample({"label": [1, 2]}, **size)).abs().max() < 2e-3 and graphs() == before + 2
    assert torch.equal(fast, model.sample({"label": [1, 2, 3]}, compile=True, **size))
    assert graphs() == before + 2  # ... and the first batch's graph is still the one used
    with torch.no_grad():
        for p in model.unet.parameters():
            p.mul_(1.1)
    plain = model.sample({"label": [1, 2, 3]}, **size)
    fast = model.sample({"label": [1, 2, 3]}, compile=True, **size)
    assert (plain - fast).abs().max() < 2e-3 and graphs() == before + 3  # compiled again on the new weights
    other = load_ldm(tmp_path / "m.safetensors")  # a second UNet of the same code, its own (unscaled) weights
    mine = other.sample({"label": [1, 2, 3]}, compile=True, **size)
    assert (mine - other.sample({"label": [1, 2, 3]}, **size)).abs().max() < 2e-3 and (mine - fast).abs().max() > 0.01
    plain = model.sample({"label": [1, 2, 3]}, precision="bf16", **size)
    fast = model.sample({"label": [1, 2, 3]}, precision="bf16", compile=True, **size)
    assert (plain - fast).abs().mean() < 5e-3 and state.failed is None  # bf16 autocast compiles too
    with pytest.raises(ValueError, match="latent size"):  # an error of the inputs is raised, not taken for a failed compile
        with model.unet.compiled(), torch.no_grad():
            model.unet(torch.zeros(1, 3, 7, 7), torch.zeros(1))
    assert state.failed is None

    other = load_ldm(tmp_path / "m.safetensors")  # a new UNet: its own state; make its compile fail
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a: (_ for _ in ()).throw(RuntimeError("no C++ compiler"))))
    plain = other.sample({"label": [4, 5]}, steps=2, seed=1)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of the UNet failed \(RuntimeError: no C\+\+ compiler\); sampling continues"):
        fast = other.sample({"label": [4, 5]}, steps=2, seed=1, compile=True)
    assert torch.equal(plain, fast) and compiled_state(other.unet).failed
    with pytest.raises(ValueError, match="compile must be true or false"):
        model.sample({"label": [1]}, steps=2, compile="yes")
    with pytest.raises(ValueError, match="compile=True and prepack=True are alternatives"):
        model.sample({"label": [1]}, steps=2, compile=True, prepack=True)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ValueError, match="compile=True is for a model on the CPU; this one is on cuda"):
        model.sample({"label": [1]}, steps=2, compile=True)


def test_two_conditioners_on_one_key_both_condition_and_negative_alone_steers(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "x").model
    model = perturbed_model(cfg).eval()
    assert model.stack.accepted_keys() == {"label": ["class", "class_vec"]}
    only_tokens = model.sample({"label": [1, 2]}, steps=3, seed=5, guidance={"class": 3.0, "class_vec": 0.0})
    only_vector = model.sample({"label": [1, 2]}, steps=3, seed=5, guidance={"class": 0.0, "class_vec": 3.0})
    neither = model.sample({"label": [1, 2]}, steps=3, seed=5, guidance={"class": 0.0, "class_vec": 0.0})
    assert not torch.allclose(only_tokens, neither) and not torch.allclose(only_vector, neither)
    # a condition key as the guidance name guides every conditioner reading it as one: here both are
    # all the conditioners, so {label: s} is the joint form with scale s, and differs from guiding each apart
    by_key = model.sample({"label": [1, 2]}, steps=3, seed=5, guidance={"label": 3.0})
    torch.testing.assert_close(by_key, model.sample({"label": [1, 2]}, steps=3, seed=5, guidance=3.0))
    apart = model.sample({"label": [1, 2]}, steps=3, seed=5, guidance={"class": 1.5, "class_vec": 1.5})
    assert not torch.allclose(by_key, apart)
    stored = load_config({**cfg.model_dump(mode="json"), "guidance": {"label": 3.0}}, type(cfg))  # a default too
    assert stored.guidance == {"label": 3.0}
    with pytest.raises(ValueError, match=r"guidance names unknown conditioner\(s\) 'caption'.*condition key: label"):
        load_config({**cfg.model_dump(mode="json"), "guidance": {"caption": 3.0}}, type(cfg))
    with pytest.raises(ValueError, match="class is given a scale twice"):
        model.sample({"label": [1, 2]}, steps=3, guidance={"label": 3.0, "class": 1.0})
    with pytest.raises(ValueError, match=r"unknown conditioner\(s\) 'caption'; this model has: class, class_vec "
                                         r"\(or a condition key: label\)"):
        model.sample({"label": [1, 2]}, steps=3, guidance={"caption": 3.0})
    # a negative condition with no positive one steers away from it (it replaces the null baseline)
    uncond = model.sample(None, n=2, steps=3, seed=5)
    away = model.sample(None, n=2, steps=3, seed=5, negative={"label": [1, 1]}, guidance=3.0)
    assert not torch.allclose(uncond, away)


def test_explicit_guidance_for_a_condition_not_given_is_an_error(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "x").model
    cfg.conditioning.conditioners[1].key = "other"
    model = LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))).eval()
    with pytest.raises(ValueError, match="'class_vec'.*other"):
        model.sample({"label": [1]}, steps=2, guidance={"class": 2.0, "class_vec": 2.0})
    model.config.guidance = {"class": 2.0, "class_vec": 2.0}  # a stored default is applied to what is given
    assert model.sample({"label": [1]}, steps=2).shape == (1, 3, 32, 32)


def test_loading_without_the_plugin_is_a_clear_error(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "x").model
    path = save_ldm(LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))), tmp_path / "m.safetensors")
    env = {**os.environ, "LDMKIT_DISABLE_PLUGINS": "class"}
    res = subprocess.run([sys.executable, "-m", "ldmkit.cli", "sample", str(path), "--cond", "label=1", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "no conditioner 'class'" in res.stderr and "ldmkit plugins" in res.stderr
    assert "Traceback" not in res.stderr


def test_sample_cli_checks_conditions_before_sampling_and_writes_reproducible_json(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "x").model
    path = save_ldm(LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))), tmp_path / "m.safetensors")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ldmkit.cli", "sample", str(path), *a], capture_output=True, text=True)
    bad = run("--cond", "label=99", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "label" in bad.stderr and "0..17" in bad.stderr and not (tmp_path / "b").exists()
    assert "condition 'label' (--cond label=99)" in bad.stderr and "sample 0" not in bad.stderr  # the flag, not an index
    bad = run("--cond", "colour=red", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "accepts: label" in bad.stderr
    ok = run("--cond", "label=4", "--n", "2", "--steps", "3", "--seed", "7", "--out", str(tmp_path / "o"))
    assert ok.returncode == 0, ok.stderr
    meta = json.loads((tmp_path / "o/0001.json").read_text())
    assert meta["conditions"] == {"label": 4} and meta["seed"] == 7 and meta["prepack"] is False
    packed = run("--cond", "label=4", "--n", "1", "--steps", "2", "--prepack", "--out", str(tmp_path / "p"))
    assert packed.returncode == 0, packed.stderr
    assert json.loads((tmp_path / "p/0000.json").read_text())["prepack"] is True
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}  # torch.compile a no-op: the flag's plumbing, not inductor
    fast = subprocess.run([sys.executable, "-m", "ldmkit.cli", "sample", str(path), "--cond", "label=4", "--n", "1",
                           "--steps", "2", "--compile", "--out", str(tmp_path / "c")], capture_output=True, text=True, env=env)
    assert fast.returncode == 0 and "compiling the UNet" in fast.stderr, fast.stderr
    assert json.loads((tmp_path / "c/0000.json").read_text())["compile"] is True
    both = run("--cond", "label=4", "--compile", "--prepack", "--out", str(tmp_path / "cp"))
    assert both.returncode == 2 and "--compile and --prepack are alternatives" in both.stderr
    assert not (tmp_path / "cp").exists() and "Traceback" not in both.stderr
    again = run("--cond", "label=4", "--n", "2", "--steps", "3", "--seed", "7", "--out", str(tmp_path / "o2"))
    assert again.returncode == 0
    assert (tmp_path / "o/0001.png").read_bytes() == (tmp_path / "o2/0001.png").read_bytes()
    # file values (@path) are read, recorded by path, and bad files are named
    (tmp_path / "label.json").write_text("4")
    (tmp_path / "label.npy").write_bytes(b"\x93NUMPY")
    at = run("--cond", f"label=@{tmp_path / 'label.json'}", "--negative", "label=2", "--guidance", "3",
             "--n", "2", "--steps", "3", "--seed", "7", "--out", str(tmp_path / "o3"))
    assert at.returncode == 0, at.stderr
    meta = json.loads((tmp_path / "o3/0000.json").read_text())
    assert meta["conditions"] == {"label": f"@{tmp_path / 'label.json'}"} and meta["negative"] == {"label": 2}
    bad = run("--cond", f"label=@{tmp_path / 'label.npy'}", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "--cond label" in bad.stderr and "not a readable .npy" in bad.stderr
    assert "Traceback" not in bad.stderr
    (tmp_path / "label.bin").write_bytes(b"4")
    bad = run("--cond", f"label=@{tmp_path / 'label.bin'}", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and ".json" in bad.stderr and "'.bin'" in bad.stderr
    # --precision bf16 and --batch: recorded, and the images are still images of the condition
    fast = run("--cond", "label=4", "--n", "3", "--steps", "3", "--seed", "7", "--batch", "2", "--precision", "bf16",
               "--out", str(tmp_path / "o4"))
    assert fast.returncode == 0, fast.stderr
    meta = json.loads((tmp_path / "o4/0002.json").read_text())
    assert (meta["batch"], meta["precision"], meta["batch_seed"]) == (2, "bf16", 1007)
    assert run("--cond", "label=4", "--batch", "0", "--out", str(tmp_path / "b")).returncode == 2


def test_eval_cli_scores_a_diffusion_model_with_the_chosen_sampler(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "x").model
    path = save_ldm(LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))), tmp_path / "m.safetensors")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ldmkit.cli", "eval", str(path), *a], capture_output=True, text=True)
    res = run("--suite", "shapes-class", "--n", "4", "--sampler", "dpmpp_2m", "--steps", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["model"] == str(path) and out["n"] == 4 and 0.0 <= out["metrics"]["class_acc"] <= 1.0
    bad = run("--suite", "shapes-class", "--n", "4", "--sampler", "euler", "--json")
    assert bad.returncode == 2 and "ddim" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("--suite", "recon-shapes", "--n", "4", "--json")
    assert bad.returncode == 2 and "recon-" in bad.stderr


def test_pipeline_call_returns_pil_images(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "x").model
    model = LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))).eval()
    images = model(label=[1, 2, 3], steps=2, seed=0, guidance=2.0)
    assert len(images) == 3 and images[0].size == (32, 32) and images[0].mode == "RGB"


def test_bf16_autocast_trains(ae_path, tmp_path):
    cfg = train_cfg(ae_path, tmp_path / "bf16", steps=2, precision="bf16", ckpt_every=2)
    assert train_diffusion(cfg, progress=False).is_file()


def test_a_channels_conditioned_model_samples_at_twice_its_training_size(ae_path, tmp_path, fresh_plugins):
    """Convolutional sampling (paper §4.3.2) with a channels conditioner: inputs, outputs and nulls at
    the asked latent size, from Python and from `ldmkit sample --height`."""
    import numpy as np

    from ldmkit import ConditionInputError
    from ldmkit.cli import main
    from toys import ToyPlugin

    fresh_plugins.get_plugin_manager(extra=[("toys", ToyPlugin())])
    data = train_cfg(ae_path, tmp_path / "x").model.model_dump()
    data["conditioning"]["conditioners"] = [{"type": "map", "channels": 2, "dropout": 0.1}]
    cfg = load_config(data)
    torch.manual_seed(0)
    model = LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))).eval()
    assert model.stack.wiring().extra_in_channels == 2
    big = model.sample({"map": [np.ones((16, 16)).tolist()] * 2}, steps=2, height=64, width=64)
    assert big.shape == (2, 3, 64, 64)
    wide = model.sample({"map": [np.ones((8, 16)).tolist()]}, steps=2, height=32, width=64)
    assert wide.shape == (1, 3, 32, 64)
    assert model.sample({"map": [np.ones((8, 8)).tolist()]}, steps=1).shape == (1, 3, 32, 32)  # training size again
    assert model.sample(n=1, steps=1, height=64, width=64).shape == (1, 3, 64, 64)  # nulls follow the size too
    with pytest.raises(ConditionInputError, match=r"condition 'map' \(sample 0\): expected a 16x16 map"):
        model.sample({"map": [np.ones((8, 8)).tolist()]}, steps=1, height=64, width=64)

    path = save_ldm(model, tmp_path / "map.safetensors")
    (tmp_path / "m.json").write_text(json.dumps(np.eye(16).tolist()))
    out = tmp_path / "s"
    assert main(["sample", str(path), "--cond", f"map=@{tmp_path / 'm.json'}", "--height", "64", "--width", "64",
                 "--n", "1", "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "0000.png").size == (64, 64)
    np.save(tmp_path / "m.npy", np.eye(16))  # an array file (no pickle) works the same
    assert main(["sample", str(path), "--cond", f"map=@{tmp_path / 'm.npy'}", "--height", "64", "--width", "64",
                 "--n", "1", "--steps", "2", "--out", str(tmp_path / "s2")]) == 0
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["sample", str(path), "--cond", f"map=@{tmp_path / 'o.npy'}", "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "s3")]) == 2  # object arrays need pickle: refused, a user error


def test_sample_cli_takes_string_fields_verbatim(ae_path, tmp_path):
    """`--cond caption=12` is the caption "12" (JSON parsing would make it a number and refuse it)."""
    from ldmkit.cli import main

    data = train_cfg(ae_path, tmp_path / "x").model.model_dump()
    data["conditioning"]["conditioners"] = [{"type": "text", "width": 16, "layers": 1, "heads": 2, "context_length": 8}]
    model = LatentDiffusion(load_config(data), Autoencoder(AutoencoderConfig(**TINY_AE)))
    path = save_ldm(model, tmp_path / "t.safetensors")
    assert main(["sample", str(path), "--cond", "caption=12", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o/0000.json").read_text())["conditions"] == {"caption": "12"}


def test_inpainting_keeps_the_known_region_with_any_sampler(ae_path, tmp_path):
    """keep_known: the final latents equal the known ones where the mask says known, whatever the sampler;
    paste: the known pixels come back exactly; off: neither holds."""
    import numpy as np

    data = train_cfg(ae_path, tmp_path / "x").model.model_dump()
    data["conditioning"]["conditioners"] = [{"type": "inpaint", "dropout": 0.1}]
    model = perturbed_model(load_config(data)).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True  # right half unknown
    value = {"inpaint": [{"image": image, "mask": mask}]}
    conditioner = model.stack.conditioners["inpaint"]
    z0, known = conditioner.known_latents(conditioner.prepare(value["inpaint"]))
    assert known[0, 0, :, :4].all() and not known[0, 0, :, 4:].any()
    seen = []
    decode = model.decode_latents
    model.decode_latents = lambda z: (seen.append(z.clone()), decode(z))[1]
    for sampler in ("ddim", "dpmpp_2m", "plms", "ddpm"):
        model.sample(value, steps=3, seed=1, sampler=sampler)
        assert torch.allclose(seen[-1][..., :4], z0[..., :4], atol=1e-6), sampler
    model.sample(value, steps=3, seed=1, keep_known=False)
    assert not torch.allclose(seen[-1][..., :4], z0[..., :4], atol=1e-3)
    pasted = model.sample(value, steps=3, seed=1)  # paste is the default
    original = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(pasted[0, :, :, :16], original[:, :, :16], atol=1e-6)
    assert not torch.allclose(pasted[0, :, :, 16:], original[:, :, 16:], atol=1e-2)
    unpasted = model.sample(value, steps=3, seed=1, paste=False)
    assert not torch.allclose(unpasted[0, :, :, :16], original[:, :, :16], atol=1e-3)
    assert torch.equal(unpasted[0, :, :, 16:], pasted[0, :, :, 16:])  # paste touches only the known pixels


def test_eval_gives_a_composed_model_only_the_suites_condition(ae_path, tmp_path):
    """ldmkit eval --suite shapes-class on a model reading label and caption gives it the label only (the
    caption conditioner gets its null); --keys chooses; an unknown key is an error naming what it reads."""
    from ldmkit.cli import main

    data = train_cfg(ae_path, tmp_path / "x").model.model_dump()
    data["conditioning"]["conditioners"] = [
        {"type": "class", "key": "label", "num_classes": 18, "dim": 16, "dropout": 0.3},
        {"type": "text", "width": 16, "layers": 1, "heads": 2, "context_length": 16, "dropout": 0.3}]
    model = LatentDiffusion(load_config(data), Autoencoder(AutoencoderConfig(**TINY_AE)))
    path = save_ldm(model, tmp_path / "m.safetensors")
    seen, prepacks, compiles = [], [], []
    original = LatentDiffusion.sample

    def spy(self, conditions=None, **kw):
        seen.append(sorted(conditions or {}))
        prepacks.append(kw.get("prepack"))
        compiles.append(kw.pop("compile", None))  # recorded, not run: test_compile_... compiles
        return original(self, conditions, **kw)

    LatentDiffusion.sample = spy
    try:
        assert main(["eval", str(path), "--suite", "shapes-class", "--n", "2", "--steps", "1", "--json"]) == 0
        assert seen[-1] == ["label"]
        assert main(["eval", str(path), "--suite", "shapes-caption", "--n", "2", "--steps", "1", "--json"]) == 0
        assert seen[-1] == ["caption"]
        assert main(["eval", str(path), "--suite", "shapes-caption", "--n", "2", "--steps", "1", "--keys", "caption",
                     "label", "--json"]) == 0
        assert seen[-1] == ["caption", "label"]
        assert main(["eval", str(path), "--suite", "shapes-class", "--n", "2", "--keys", "boxes"]) == 2
        assert main(["eval", str(path), "--suite", "shapes-class", "--n", "2", "--steps", "1", "--prepack", "--json"]) == 0
        assert prepacks[-1] is True and prepacks[0] is False  # `ldmkit eval --prepack` reaches model.sample
        assert main(["eval", str(path), "--suite", "shapes-class", "--n", "2", "--steps", "1", "--compile", "--json"]) == 0
        assert compiles[-1] is True and compiles[0] is False
    finally:
        LatentDiffusion.sample = original


def test_a_model_can_reference_its_zoo_autoencoder_instead_of_bundling_it(tmp_path):
    """save_ldm(bundle_autoencoder=False): no autoencoder tensors, the zoo name and digest instead; it loads
    and samples exactly as the bundled file; a digest that no longer matches is refused."""
    import ldmkit
    from ldmkit.models.ldm import AUTOENCODER_DIGEST_KEY
    from ldmkit.train.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint

    data = {"image_size": 32, "autoencoder": "zoo:shapes-kl-f4", "latent_channels": 3, "downsample_factor": 4,
            "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "num_heads": 2},
            "conditioning": {"context_dim": 16, "conditioners": [{"type": "class", "num_classes": 18, "dim": 16}]}}
    torch.manual_seed(0)
    model = LatentDiffusion(load_config(data), ldmkit.load("zoo:shapes-kl-f4")).eval()
    bundled = save_ldm(model, tmp_path / "b.safetensors")
    referenced = save_ldm(model, tmp_path / "r.safetensors", bundle_autoencoder=False)
    assert referenced.stat().st_size < bundled.stat().st_size - 1_000_000
    assert not any(k.startswith("autoencoder.") for k in load_checkpoint(referenced).tensors)
    a = load_ldm(bundled).sample({"label": [3]}, steps=2)
    b = load_ldm(referenced).sample({"label": [3]}, steps=2)
    assert torch.equal(a, b)
    ckpt = load_checkpoint(referenced)
    meta = {**read_metadata(referenced), AUTOENCODER_DIGEST_KEY: "0" * 64}
    save_checkpoint(tmp_path / "t.safetensors", dict(ckpt.tensors), meta)
    with pytest.raises(CheckpointError, match="needs the autoencoder it was trained with"):
        load_ldm(tmp_path / "t.safetensors")
    model.config.autoencoder = str(tmp_path / "some.safetensors")
    with pytest.raises(ValueError, match="only a zoo autoencoder can be referenced"):
        save_ldm(model, tmp_path / "x.safetensors", bundle_autoencoder=False)


def test_data_options_reach_the_data_set_and_bad_ones_are_named(ae_path, tmp_path, monkeypatch):
    """`data.options` is passed to load_dataset (here shapes' only_captioned); an option the data set lacks
    fails before training, naming it and the data set's options."""
    import ldmkit.data as data

    seen = []
    real = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    cfg = train_cfg(ae_path, tmp_path / "o", steps=1, data={"name": "shapes", "split": "train-text", "cache_size": 16,
                                                           "options": {"only_captioned": True}})
    train_diffusion(cfg, progress=False)
    assert seen[0]["only_captioned"] is True
    bad = train_cfg(ae_path, tmp_path / "b", steps=1, data={"name": "shapes", "options": {"captioned": True}})
    with pytest.raises(ValueError, match="data set 'shapes' has no option 'captioned'; its options: length, only_captioned"):
        train_diffusion(bad, progress=False)
    assert not (tmp_path / "b" / "last.safetensors").exists()
