"""Configs (the registry-backed conditioner union) and the committed JSON Schemas."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from ldmkit import schema as schema_mod
from ldmkit.config import ConfigError, LatentDiffusionConfig, load_config
from ldmkit.wiring import describe_wiring

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs/ldm/compose-demo.yaml"


def test_demo_config_wires_the_unet():
    desc = describe_wiring(load_config(DEMO))
    assert [r["route"] for r in desc["conditioners"]] == ["tokens", "vector", "vector"]
    assert desc["unet"] == {
        "in_channels": 4, "out_channels": 4, "context_dim": 128, "context_tokens": 1,
        "extra_in_channels": 0, "vector_dim": 128,
    }


def test_conditioner_configs_are_the_plugins_own_models():
    cfg = load_config({"conditioning": {"conditioners": [{"type": "class", "num_classes": 5}, {"type": "scalar", "high": 3}]}})
    types = [type(c).__name__ for c in cfg.conditioning.conditioners]
    assert types == ["ClassConfig", "ScalarConfig"]
    again = load_config(json.loads(cfg.model_dump_json()))
    assert again == cfg  # plugin fields survive serialization (SerializeAsAny)


def test_unknown_conditioner_type_lists_installed():
    with pytest.raises(ConfigError, match=r"no conditioner 'sketch'; installed: class, inpaint, layout, lowres, noise_level, scalar, semantic, text"):
        load_config({"conditioning": {"conditioners": [{"type": "sketch"}]}})


def test_plugin_field_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        load_config({"conditioning": {"conditioners": [{"type": "class", "num_classes": 0, "colour": "red"}]}})
    msg = str(info.value)
    assert "conditioners.0.num_classes" in msg and "conditioners.0.colour: Extra inputs are not permitted" in msg


def test_core_field_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 30\ndownsample_factor: 4\nunet: {channel_mult: [1, 2], attention_levels: [3]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "attention_levels [3] out of range; allowed 0..1" in str(info.value)
    with pytest.raises(ConfigError, match="downsample_factor"):
        load_config({"downsample_factor": 3})


def test_duplicate_instance_names_rejected():
    with pytest.raises(ConfigError, match="duplicated: class"):
        load_config({"conditioning": {"conditioners": [{"type": "class"}, {"type": "class", "route": "vector"}]}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_committed_schemas_are_fresh():
    res = subprocess.run([sys.executable, "-m", "ldmkit.cli", "schema", "--check", "--out", str(REPO / "schemas")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_schema_check_fails_after_a_config_model_changes(monkeypatch):
    assert schema_mod.check_schemas(REPO / "schemas") == []

    class Changed(LatentDiffusionConfig):
        guidance_rescale: float = Field(default=0.0, description="a new field")

    monkeypatch.setattr(schema_mod, "LatentDiffusionConfig", Changed)
    problems = schema_mod.check_schemas(REPO / "schemas")
    stale = {p.split(": stale")[0].rsplit("/", 1)[-1] for p in problems if ": stale" in p}
    assert {"latent_diffusion.schema.json", "diffusion_train.schema.json"} <= stale
    assert all("guidance_rescale" in p for p in problems)


def test_schema_cli_exits_1_on_stale_files(tmp_path):
    subprocess.run([sys.executable, "-m", "ldmkit.cli", "schema", "--out", str(tmp_path)], check=True, capture_output=True)
    path = tmp_path / "latent_diffusion.schema.json"
    data = json.loads(path.read_text())
    data["title"] = "edited by hand"
    path.write_text(json.dumps(data))
    res = subprocess.run([sys.executable, "-m", "ldmkit.cli", "schema", "--check", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "stale" in res.stderr


def test_schema_has_the_first_party_union():
    data = json.loads((REPO / "schemas/latent_diffusion.schema.json").read_text())
    text = json.dumps(data)
    assert '"ClassConfig"' in text and '"ScalarConfig"' in text and '"discriminator"' in text


def test_schema_is_independent_of_third_party_plugins(fresh_plugins):
    from toys import ToyPlugin

    fresh_plugins.get_plugin_manager(extra=[("toys", ToyPlugin())])
    assert schema_mod.check_schemas(REPO / "schemas") == []
