"""End-to-end sampling: ldmkit against a diffusers pipeline built from the same weights (zoo:shapes-class).

What is shared and what differs:

- shared: the weights (ldmkit's UNet is copied tensor by tensor into a diffusers ``UNet2DConditionModel``
  of the same configuration; the copy is checked by comparing both UNets on random inputs), the
  conditioner τθ (the class token and the null token come from ldmkit's conditioning stack, computed once
  per batch on both sides), the noise schedule (a ``DDIMScheduler`` with ``trained_betas`` = ldmkit's
  betas, spacing and offset chosen so that the DDIM timesteps are ldmkit's; both grids are printed and
  compared), the first stage (ldmkit's autoencoder decodes both sides' latents), guidance (the model's
  default scale, ``config.guidance``) and the batching scheme (chunks of ``--ldmkit-batch`` /
  ``--diffusers-batch`` images, default ``ldmkit sample``'s 64, chunk k seeded with ``seed + 1000 k``);
- different: the denoising loop and the UNet. ldmkit runs exactly what ``ldmkit sample zoo:shapes-class``
  runs by default: ``model.sample(conditions, sampler="ddim", steps=50, seed=...)`` (plus the keyword
  arguments given with ``--ldmkit-options JSON``, to benchmark speed options); diffusers runs the standard
  pipeline loop (``scheduler.set_timesteps``; per step ``cat([latents] * 2)``, ``unet(...).sample``,
  ``chunk(2)``, ``uncond + g * (cond - uncond)``, ``scheduler.step(...).prev_sample``, under
  ``torch.no_grad`` as diffusers pipelines are).

Both sides generate one image per held-out condition of the ``shapes-class`` evaluation suite
(``ldmkit.evaluate.run_suite("shapes-class", n=N, mode="model", generate=...)``), i.e. each image asks for
its condition's label, and are scored by the suite (``class_acc``: the parsed largest object has the asked
class). Both sides draw their initial noise the same way (a CPU generator seeded per chunk, one
``randn`` of the latent shape), so with the default options the images should agree up to float rounding
(the largest per-pixel difference of the uint8 images is printed too); class_acc of both sides should
agree.

Times are wall clock of the whole generation of each side (conditioning, sampling, decoding, conversion to
uint8 images), after one small warm-up call of each, with ``torch.set_num_threads(--threads)``; with
``--device cuda`` both sides run on the GPU (the UNets are built and compared on the CPU first). The ratio
is diffusers time / ldmkit time, so above 1 means ldmkit is faster. The last line of output is one JSON
object.

Usage: python benchmarks/sample_vs_diffusers.py [--n 256] [--steps 50] [--threads 2] [--device cpu|cuda]
       [--ldmkit-options '{"precision": "bf16"}' | '{"cuda_graph": true}'] [--ldmkit-batch 64] [--diffusers-batch 64]
"""

from __future__ import annotations

import ldmkit  # noqa: E402  (before torch: chooses how OpenMP threads wait, ldmkit.WAIT_POLICY)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

MODEL = "zoo:shapes-class"
SUITE = "shapes-class"


# -- the diffusers UNet --------------------------------------------------------------------------------
def _check_group_norms(unet: nn.Module, groups: int) -> None:
    """diffusers uses one group count (``norm_num_groups``) everywhere; ldmkit's ``group_norm`` picks one
    per width. The copy is exact only if they agree for every norm in this model."""
    odd = {(m.num_channels, m.num_groups) for m in unet.modules() if isinstance(m, nn.GroupNorm) and m.num_groups != groups}
    if odd:
        raise ValueError(f"ldmkit's group_norm picks other group counts than {groups} for (channels, groups) "
                         f"{sorted(odd)}: diffusers' single norm_num_groups cannot mirror this UNet")
    eps = {m.eps for m in unet.modules() if isinstance(m, nn.GroupNorm)}
    if eps != {1e-6}:
        raise ValueError(f"expected GroupNorm eps 1e-6 everywhere, got {sorted(eps)}")


def build_diffusers_unet(unet: nn.Module) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` with the configuration of ldmkit's ``unet`` (random weights).

    Notes on the mapping of the configuration:

    - GroupNorm: 32 groups everywhere (checked), eps 1e-6 (``norm_eps`` sets the ResBlocks' and the output
      norm's; diffusers' transformers hard-code 1e-6, as ldmkit); LayerNorms keep eps 1e-5 on both sides.
    - timestep embedding ``cat([cos, sin])`` with ``exp(-ln(10000) i / half)``: ``flip_sin_to_cos=True,
      freq_shift=0``; the MLP is ``Linear(mc, 4 mc) - SiLU - Linear`` on both sides.
    - heads: in ``UNet2DConditionModel`` the argument ``attention_head_dim`` is, for historical reasons
      (diffusers issue #2011), the number of heads (``num_attention_heads`` is refused), so it gets
      ``num_heads``; the head width is then ``width // num_heads`` (checked after construction).
    """
    from diffusers import UNet2DConditionModel

    cfg, wiring = unet.config, unet.wiring
    if wiring.extra_in_channels or wiring.vector_dim:
        raise ValueError("only the tokens route (cross-attention) is mirrored here, not channels or vector routes")
    if wiring.context_dim is None:
        raise ValueError("the UNet has no cross-attention context")
    mc, mult = cfg.model_channels, list(cfg.channel_mult)
    if mult[0] != 1:
        raise ValueError("diffusers' time embedding takes block_out_channels[0] = model_channels; channel_mult[0] must be 1")
    _check_group_norms(unet, 32)
    widths = tuple(mc * m for m in mult)
    attn = [i in cfg.attention_levels for i in range(len(mult))]
    model = UNet2DConditionModel(
        sample_size=None, in_channels=unet.in_channels, out_channels=unet.latent_channels,
        flip_sin_to_cos=True, freq_shift=0, block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=wiring.context_dim, transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=cfg.num_heads,  # = the number of heads in this class, see the docstring
        norm_num_groups=32, norm_eps=1e-6, act_fn="silu", use_linear_projection=True, dropout=cfg.dropout,
        downsample_padding=1, mid_block_scale_factor=1.0,
    )
    for name, m in model.named_modules():
        if hasattr(m, "heads") and hasattr(m, "to_q") and m.heads != cfg.num_heads:
            raise AssertionError(f"diffusers attention {name} has {m.heads} heads, ldmkit {cfg.num_heads}")
    return model.eval()


def _leaf_pairs(unet: nn.Module) -> list[tuple[str, str]]:
    """(ldmkit module path, diffusers module path) for every parameter-holding leaf of ldmkit's UNet,
    walked from the module structure (levels, blocks, ResBlocks, transformers)."""
    pairs: list[tuple[str, str]] = []

    def res(l: str, d: str, block: nn.Module) -> None:
        pairs.extend([(f"{l}.in_layers.0", f"{d}.norm1"), (f"{l}.in_layers.2", f"{d}.conv1"),
                      (f"{l}.emb_layers.1", f"{d}.time_emb_proj"), (f"{l}.out_layers.0", f"{d}.norm2"),
                      (f"{l}.out_layers.3", f"{d}.conv2")])
        if not isinstance(block.skip, nn.Identity):
            pairs.append((f"{l}.skip", f"{d}.conv_shortcut"))

    def attention(l: str, d: str) -> None:
        pairs.extend([(f"{l}.to_q", f"{d}.to_q"), (f"{l}.to_k", f"{d}.to_k"), (f"{l}.to_v", f"{d}.to_v"),
                      (f"{l}.to_out", f"{d}.to_out.0")])

    def transformer(l: str, d: str, st: nn.Module) -> None:
        pairs.extend([(f"{l}.norm", f"{d}.norm"), (f"{l}.proj_in", f"{d}.proj_in"), (f"{l}.proj_out", f"{d}.proj_out")])
        for k, tb in enumerate(st.blocks):
            lb, db = f"{l}.blocks.{k}", f"{d}.transformer_blocks.{k}"
            pairs.append((f"{lb}.norm1", f"{db}.norm1"))
            attention(f"{lb}.attn1", f"{db}.attn1")
            if tb.cross:
                pairs.append((f"{lb}.norm2", f"{db}.norm2"))
                attention(f"{lb}.attn2", f"{db}.attn2")
            pairs.extend([(f"{lb}.norm3", f"{db}.norm3"), (f"{lb}.ff.proj", f"{db}.ff.net.0.proj"),
                          (f"{lb}.ff.out.1", f"{db}.ff.net.2")])

    def block(l: str, d_res: str, d_attn: str | None, b: nn.Module) -> None:
        res(f"{l}.res", d_res, b.res)
        if b.attn is not None:
            if d_attn is None:
                raise ValueError(f"{l} has a transformer but its diffusers block has none")
            transformer(f"{l}.attn", d_attn, b.attn)

    pairs.extend([("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                  ("conv_in", "conv_in")])
    for level, blocks in enumerate(unet.down):
        for j, b in enumerate(blocks):
            block(f"down.{level}.{j}", f"down_blocks.{level}.resnets.{j}", f"down_blocks.{level}.attentions.{j}", b)
    for level, conv in enumerate(unet.downsample):
        pairs.append((f"downsample.{level}", f"down_blocks.{level}.downsamplers.0.conv"))
    mid_res, mid_attn = 0, 0
    for j, b in enumerate(unet.mid):  # ldmkit: [Res + Transformer, Res]; diffusers: resnets[0], attentions[0], resnets[1]
        block(f"mid.{j}", f"mid_block.resnets.{mid_res}", f"mid_block.attentions.{mid_attn}", b)
        mid_res += 1
        mid_attn += b.attn is not None
    for i, blocks in enumerate(unet.up):
        for j, b in enumerate(blocks):
            block(f"up.{i}.{j}", f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}", b)
    for i, conv in enumerate(unet.upsample):
        pairs.append((f"upsample.{i}", f"up_blocks.{i}.upsamplers.0.conv"))
    pairs.extend([("out.0", "conv_norm_out"), ("out.2", "conv_out")])
    return pairs


def unet_name_map(unet: nn.Module) -> dict[str, str]:
    """``{ldmkit parameter name: diffusers parameter name}`` for every parameter of ldmkit's UNet."""
    modules = dict(unet.named_modules())
    mapping: dict[str, str] = {}
    for l, d in _leaf_pairs(unet):
        for pname, _ in modules[l].named_parameters(recurse=False):
            mapping[f"{l}.{pname}"] = f"{d}.{pname}"
    return mapping


@torch.no_grad()
def copy_unet_weights(unet: nn.Module, dunet: nn.Module) -> dict[str, str]:
    """Copy every tensor of ldmkit's ``unet`` into the diffusers ``dunet``; returns the name map.

    Every diffusers parameter is assigned exactly once with a tensor of its shape; any ldmkit or diffusers
    tensor (parameter or buffer) left over raises a ``ValueError``."""
    mapping = unet_name_map(unet)
    src, dst = dict(unet.named_parameters()), dict(dunet.named_parameters())
    for what, model in (("ldmkit", unet), ("diffusers", dunet)):
        buffers = [n for n in model.state_dict() if n not in dict(model.named_parameters())]
        if buffers:
            raise ValueError(f"{what} UNet has tensors that are not parameters, not mapped: {buffers[:5]}")
    unmapped = sorted(set(src) - set(mapping))
    if unmapped:
        raise ValueError(f"ldmkit parameters without a diffusers name: {unmapped[:8]}")
    missing = sorted(set(mapping.values()) - set(dst))
    if missing:
        raise ValueError(f"mapped to names diffusers does not have: {missing[:8]}")
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        raise ValueError("two ldmkit parameters map to the same diffusers parameter")
    left = sorted(set(dst) - set(targets))
    if left:
        raise ValueError(f"diffusers parameters left unassigned: {left[:8]} ({len(left)} in all)")
    for l, d in mapping.items():
        if src[l].shape != dst[d].shape:
            raise ValueError(f"shape mismatch: ldmkit {l} {tuple(src[l].shape)} vs diffusers {d} {tuple(dst[d].shape)}")
        dst[d].copy_(src[l])
    return mapping


@torch.no_grad()
def unet_max_abs_diff(unet: nn.Module, dunet: nn.Module, batch: int = 4, size: int = 8, seed: int = 0) -> float:
    """Max |ldmkit − diffusers| of the two UNets' outputs on random ``x (B, C, size, size)``, ``t``, context (fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, unet.wiring.context_tokens, unet.wiring.context_dim, generator=g)
    a = unet(x, t, ctx, None)
    b = dunet(x, t, encoder_hidden_states=ctx).sample
    return float((a - b).abs().max())


# -- the scheduler -------------------------------------------------------------------------------------
def build_scheduler(schedule: Any):
    """diffusers' ``DDIMScheduler`` with ldmkit's betas and ldmkit's DDIM grid (``"leading"``, offset 1,
    final ᾱ = ᾱ_0: ``set_alpha_to_one=False``), no clipping, ε prediction."""
    from diffusers import DDIMScheduler

    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[schedule.parameterization]
    return DDIMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.numpy(),
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=pred, thresholding=False)


def compare_schedules(schedule: Any, scheduler: Any, steps: int, ldmkit_options: dict | None = None) -> dict[str, Any]:
    """ldmkit's DDIM grid and final ᾱ against the scheduler's (with the grid options of ``ldmkit_options``)."""
    from ldmkit.diffusion.samplers import spaced_timesteps

    opts = ldmkit_options or {}
    grid = spaced_timesteps(steps, schedule.num_timesteps, opts.get("spacing", "leading"), opts.get("offset", 1))
    scheduler.set_timesteps(steps)
    theirs = [int(t) for t in scheduler.timesteps]
    # diffusers steps from t to t - T // steps (the final ᾱ when negative); ldmkit to the next grid entry
    ratio = scheduler.config.num_train_timesteps // steps
    prev_theirs = [t - ratio if t - ratio >= 0 else None for t in theirs]
    prev_ours = grid[1:] + [None]
    final_ours = 1.0 if opts.get("set_alpha_to_one", False) else float(schedule.alphas_cumprod_f64[0])
    final_theirs = float(scheduler.final_alpha_cumprod)
    return {
        "timesteps_match": grid == theirs,
        "prev_timesteps_match": prev_theirs == prev_ours,
        "ldmkit": grid, "diffusers": theirs,
        "final_alpha_ldmkit": final_ours, "final_alpha_diffusers": final_theirs,
        "alphas_cumprod_max_abs_diff": float((scheduler.alphas_cumprod.double() - schedule.alphas_cumprod_f64).abs().max()),
    }


# -- the two samplers ----------------------------------------------------------------------------------
def _chunks(n: int, size: int):
    for k, start in enumerate(range(0, n, size)):
        yield k, start, min(n, start + size)


def ldmkit_generate(model: Any, labels: list[int], *, steps: int, seed: int, guidance: float,
                    options: dict[str, Any], batch: int) -> list:
    """What ``ldmkit sample --batch B`` does (chunks of B, chunk k seeded seed + 1000 k), per-image labels."""
    from ldmkit.models.ldm import tensor_to_images

    out: list = []
    for k, start, stop in _chunks(len(labels), batch):
        kwargs = {"guidance": guidance, "sampler": "ddim", "steps": steps, "seed": seed + 1000 * k, **options}
        out.extend(tensor_to_images(model.sample({"label": labels[start:stop]}, **kwargs)))
    return out


@torch.no_grad()
def diffusers_generate(model: Any, dunet: nn.Module, scheduler: Any, labels: list[int], *, steps: int, seed: int,
                       guidance: float, batch: int) -> list:
    """The standard diffusers text-to-image loop, with ldmkit's conditioner and autoencoder around it."""
    from ldmkit.models.ldm import tensor_to_images

    stack, device = model.stack, model.device
    keep_all = {name: True for name in stack.names}
    f = model.config.downsample_factor
    h = w = model.config.image_size // f
    out: list = []
    for k, start, stop in _chunks(len(labels), batch):
        labelled = {"label": labels[start:stop]}
        b = stop - start
        # τθ once per batch, as m.sample/GuidedDenoiser does: the class token, and the null token
        cond = stack.compose(stack.encode(labelled, names=stack.names_for(labelled), device=device), keep_all)
        uncond = stack.compose(stack.nulls(b), keep_all)
        for c in (cond, uncond):
            if c.channels is not None or c.vector is not None:
                raise ValueError("this loop mirrors the tokens route only")
            if c.context_mask is not None and not bool(c.context_mask.all()):
                raise ValueError("a key-padding mask with padded tokens is not mirrored here")
        prompt_embeds = torch.cat([uncond.context, cond.context]).to(device)
        generator = torch.Generator(device="cpu").manual_seed(seed + 1000 * k)
        latents = torch.randn((b, model.config.latent_channels, h, w), generator=generator).to(device)
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 2)
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = dunet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
        out.extend(tensor_to_images(model.autoencoder.decode(latents).clamp(-1, 1)))
    return out


# -- main ----------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="images per side (held-out shapes-class conditions)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, ldmkit sample's default)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides sample (default cpu)")
    p.add_argument("--ldmkit-options", default="{}", metavar="JSON",
                   help="extra keyword arguments for ldmkit's model.sample, e.g. '{\"precision\": \"bf16\"}'")
    p.add_argument("--ldmkit-batch", type=int, default=None, help="images per ldmkit chunk (default: ldmkit sample's 64)")
    p.add_argument("--diffusers-batch", type=int, default=None, help="images per diffusers batch (default 64)")
    args = p.parse_args()
    from ldmkit.cli import SAMPLE_CHUNK

    args.ldmkit_batch = args.ldmkit_batch or SAMPLE_CHUNK
    args.diffusers_batch = args.diffusers_batch or SAMPLE_CHUNK
    options = json.loads(args.ldmkit_options)
    if not isinstance(options, dict):
        raise SystemExit("--ldmkit-options must be a JSON object")
    torch.set_num_threads(args.threads)

    import diffusers

    import ldmkit
    from ldmkit.evaluate import run_suite

    model = ldmkit.load(MODEL)
    guidance = float(model.config.guidance)
    dunet = build_diffusers_unet(model.unet)
    mapping = copy_unet_weights(model.unet, dunet)
    params = {"ldmkit": sum(q.numel() for q in model.unet.parameters()), "diffusers": sum(q.numel() for q in dunet.parameters())}
    diff = unet_max_abs_diff(model.unet, dunet)
    print(f"UNet: {len(mapping)} tensors copied, parameters ldmkit {params['ldmkit']:,} diffusers {params['diffusers']:,}; "
          f"max |ldmkit - diffusers| on random inputs: {diff:.3g}")
    if diff >= 1e-4:
        raise SystemExit(f"the UNets disagree (max abs diff {diff:.3g} >= 1e-4): the weight mapping is wrong")
    if args.device != "cpu":
        model, dunet = model.to(args.device), dunet.to(args.device)

    scheduler = build_scheduler(model.schedule)
    cmp = compare_schedules(model.schedule, scheduler, args.steps, options)
    print(f"DDIM timesteps ({args.steps}): ldmkit {cmp['ldmkit'][:3]}...{cmp['ldmkit'][-2:]}  diffusers "
          f"{cmp['diffusers'][:3]}...{cmp['diffusers'][-2:]}  match: {cmp['timesteps_match']} "
          f"(previous timesteps match: {cmp['prev_timesteps_match']})")
    print(f"final alpha_bar: ldmkit {cmp['final_alpha_ldmkit']:.8f} diffusers {cmp['final_alpha_diffusers']:.8f}; "
          f"alphas_cumprod max abs diff (diffusers float32 cumprod vs ldmkit float64): {cmp['alphas_cumprod_max_abs_diff']:.2g}")

    def ldmkit_side(labels: list[int]) -> list:
        return ldmkit_generate(model, labels, steps=args.steps, seed=args.seed, guidance=guidance, options=options,
                               batch=args.ldmkit_batch)

    def diffusers_side(labels: list[int]) -> list:
        return diffusers_generate(model, dunet, scheduler, labels, steps=args.steps, seed=args.seed, guidance=guidance,
                                  batch=args.diffusers_batch)

    sides = {"ldmkit": ldmkit_side, "diffusers": diffusers_side}
    for fn in sides.values():  # warm-up: one small call (2 images) of each side
        fn([0, 1])
    seconds: dict[str, float] = {}
    acc: dict[str, float] = {}
    produced: dict[str, list] = {}
    for name, fn in sides.items():
        def generate(conditions, fn=fn, name=name):
            labels = [int(c.label) for c in conditions]
            t0 = time.perf_counter()
            images = fn(labels)
            seconds[name] = time.perf_counter() - t0
            produced[name] = images
            return images

        acc[name] = run_suite(SUITE, n=args.n, mode="model", generate=generate)["class_acc"]
        print(f"{name:<9} {seconds[name]:8.1f} s  ({args.n / seconds[name]:.2f} images/s)  class_acc {acc[name]:.3f}")
    speedup = seconds["diffusers"] / seconds["ldmkit"]
    pixel_diff = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                     for a, b in zip(produced["ldmkit"], produced["diffusers"]))
    print(f"largest per-pixel difference between the two sides' images (uint8): {pixel_diff}")
    print(f"diffusers / ldmkit time: {speedup:.3f} (above 1: ldmkit is faster)")
    print(json.dumps({
        "benchmark": "sample_vs_diffusers", "model": MODEL, "n": args.n, "steps": args.steps, "guidance": guidance,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "omp_wait": ldmkit.WAIT_POLICY, "diffusers": diffusers.__version__,
        "unet_max_abs_diff": diff, "timesteps_match": cmp["timesteps_match"],
        "ldmkit_seconds": round(seconds["ldmkit"], 2), "diffusers_seconds": round(seconds["diffusers"], 2),
        "speedup": round(speedup, 3), "class_acc": {"ldmkit": acc["ldmkit"], "diffusers": acc["diffusers"]},
        "ldmkit_options": options, "ldmkit_batch": args.ldmkit_batch, "diffusers_batch": args.diffusers_batch,
        "images_max_abs_diff": pixel_diff,
    }))


if __name__ == "__main__":
    main()
