"""The measuring scripts the docs point at still run (on a tiny untrained model: mechanics, not quality)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldmkit.config import LatentDiffusionConfig, load_config
from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmkit.models.ldm import LatentDiffusion, save_ldm

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = dict(kind="kl", resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
               z_channels=3, embed_dim=3, norm_groups=4)


def test_guidance_tradeoff_scores_each_setting_against_its_own_condition(tmp_path):
    cfg = load_config({
        "image_size": 32, "latent_channels": 3, "downsample_factor": 4,
        "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "num_heads": 2},
        "conditioning": {"context_dim": 16, "conditioners": [
            {"type": "text", "key": "caption", "context_length": 16, "width": 16, "layers": 1, "heads": 2},
            {"type": "layout", "key": "boxes", "max_objects": 4, "dim": 16},
        ]},
    }, LatentDiffusionConfig)
    model = save_ldm(LatentDiffusion(cfg, Autoencoder(AutoencoderConfig(**TINY_AE))), tmp_path / "m.safetensors")
    out = tmp_path / "t.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts/guidance_tradeoff.py"), str(model), "--n", "2",
                          "--scales", "text=2,layout=0", "text=0,layout=2", "--json", str(out), "--out",
                          str(tmp_path / "t.png")], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["scales"] for r in rows] == [{"text": 2.0, "layout": 0.0}, {"text": 0.0, "layout": 2.0}]
    assert all(0 <= r["caption_acc"] <= 1 and 0 <= r["miou"] <= 1 for r in rows)
    assert (tmp_path / "t.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/guidance_tradeoff.py"), str(model), "--scales", "text:2"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "NAME=SCALE" in bad.stderr


def test_text_tower_hard_negatives_change_exactly_what_they_say():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pretrain_text_tower import KINDS, hard_negative
    finally:
        sys.path.pop(0)

    from ldmkit.data.shapes import parse_caption

    rng = np.random.default_rng(0)
    two = "a small red circle above a blue square"
    assert hard_negative(two, rng, "swap_colours")[0] == "a small blue circle above a red square"
    assert hard_negative(two, rng, "swap_shapes")[0] == "a small red square above a blue circle"
    assert hard_negative(two, rng, "reverse_relation")[0] == "a small red circle below a blue square"
    assert hard_negative(two, rng, "size")[0] == "a large red circle above a blue square"
    # a kind that cannot apply falls back to one that can; the negative always parses and differs
    assert hard_negative("a green triangle", rng, "swap_colours")[1] in ("colour", "shape")
    for caption in (two, "a green triangle", "a large cyan circle left of a large cyan square"):
        for kind in KINDS:
            neg, used = hard_negative(caption, rng, kind)
            assert neg != caption and parse_caption(neg)


def test_caption_breakdown_is_full_on_ground_truth_and_not_on_other_scenes(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from caption_breakdown import breakdown

    from ldmkit.evaluate import derangement, suite_conditions

    conds = suite_conditions("shapes-caption", 40)
    truth = breakdown(conds, [c.image for c in conds], 40)
    for c in truth.values():  # the parser's ceiling: every asked object found, every relation holds
        assert c["one_object_drawn_at_size"] == c["one_object"] > 0
        assert c["both_drawn"] == c["both_drawn_at_size"] == c["relation_holds_given_both"] == c["two_objects"] > 0
    twice = breakdown(conds, [c.image for c in conds for _ in range(2)], 40, per_caption=2)
    assert twice == {g: {k: 2 * v for k, v in c.items()} for g, c in truth.items()}  # each sample counted
    with pytest.raises(ValueError, match="per_caption"):
        breakdown(conds, [c.image for c in conds], 40, per_caption=2)
    other = breakdown(conds, [conds[j].image for j in derangement(len(conds), 0)], 40)
    assert sum(c.get("both_drawn", 0) for c in other.values()) < 0.3 * sum(c["two_objects"] for c in other.values())
    missed = ("swapped", "colour_kept", "shape_kept", "neither")  # every missed first object is in one class
    assert not any(k.startswith("first_missed") for c in truth.values() for k in c)
    for c in other.values():
        assert sum(c.get(f"first_missed_{k}", 0) for k in missed) == c["two_objects"] - c.get("first_drawn", 0) > 0
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts/caption_breakdown.py"), "--reference", "--n", "4",
                          "--json", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "relation holds" in res.stdout and json.loads(out.read_text())["counts"]["eval"]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/caption_breakdown.py")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--reference" in bad.stderr


def test_caption_breakdown_says_what_stands_in_for_a_missed_object(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from caption_breakdown import _instead, _sheet
    from PIL import Image

    from ldmkit.data.shapes import render_scene
    from ldmkit.metrics.shapes import parse_scene

    def scene(*objs):  # (shape, colour, centre x): two large objects side by side
        return parse_scene(render_scene([{"shape": s, "colour": c, "r": 6.0, "cx": x, "cy": 16.0} for s, c, x in objs],
                                        32)[0])

    miss, other = {"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}
    # "a red circle ... a blue square" drawn as a red square and a blue circle: the attributes swapped
    assert _instead(miss, other, scene(("square", "red", 8.0), ("circle", "blue", 24.0))) == "swapped"
    assert _instead(miss, other, scene(("square", "red", 8.0), ("square", "blue", 24.0))) == "colour_kept"
    assert _instead(miss, other, scene(("circle", "green", 8.0), ("square", "blue", 24.0))) == "shape_kept"
    assert _instead(miss, other, scene(("triangle", "green", 8.0), ("square", "blue", 24.0))) == "neither"
    # the object that realizes the other mention does not count as a stand-in
    assert _instead({"shape": "circle", "colour": "blue"}, other, scene(("square", "blue", 24.0))) == "neither"
    # a blob of the right colour is not a recognisable object: neither
    blob = np.full((32, 32, 3), 100, np.uint8)
    blob[4:12, 2:30] = (255, 0, 0)  # a long red bar, no shape of the world
    assert _instead(miss, other, parse_scene(blob)) == "neither"

    from ldmkit.evaluate import suite_conditions

    pairs = [c for c in suite_conditions("shapes-caption", 20)[20:] if len(c.meta["caption"]["objects"]) == 2][:3]
    _sheet(tmp_path / "s.png", pairs, lambda cs: [c.image for c in cs], per=2)  # rows: scene + 2 samples
    assert Image.open(tmp_path / "s.png").size[1] >= 3 * 32 * 3
