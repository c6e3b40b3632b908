"""Plugins bring their own data: condition fields declared by plugins, in training, manifests, sampling and errors.

The end-to-end test uses ``tests/fixtures/palette``: a third-party plugin package found through a real
``ldmkit`` entry point (its dist-info on PYTHONPATH), declaring the field ``palette`` and deriving it
from shapes scenes. Nothing is registered by monkeypatching.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import ConditionerSpec, ConditionField, ConditionInputError, Route, Sample
from ldmkit.registry import Registry, SpecError
from toys import LEVEL, Level, LevelConfig, ToyPlugin

PALETTE_DIR = Path(__file__).parent / "fixtures" / "palette"


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PALETTE_DIR), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("LDMKIT_DISABLE_PLUGINS", None)
    return env


def _ldmkit(*args, **env):
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True, env=_env(**env))


@pytest.fixture
def palette_installed(fresh_plugins, monkeypatch):
    """The palette fixture visible to this process through its entry point (as if pip-installed)."""
    monkeypatch.syspath_prepend(str(PALETTE_DIR))
    fresh_plugins.reset()
    yield fresh_plugins
    sys.modules.pop("ldmkit_palette", None)


@pytest.mark.slow
def test_a_third_party_field_trains_with_ldmkit_train_and_samples_with_cond(tmp_path):
    # `ldmkit plugins` lists the field the plugin adds, with its JSON Schema
    res = _ldmkit("plugins", "--json")
    assert res.returncode == 0, res.stderr
    row = {r["name"]: r for r in json.loads(res.stdout)}["palette"]
    assert row["status"] == "active" and row["conditioners"] == ["palette"]
    (field,) = row["fields"]
    assert field["name"] == "palette" and field["derived"] is True and field["schema"]["type"] == "array"
    assert "fields: palette" in _ldmkit("plugins").stdout

    # plain `ldmkit train` on the shapes world: the palette is derived from each scene
    torch.manual_seed(0)
    from ldmkit.models.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder

    ae = tmp_path / "ae.safetensors"
    save_autoencoder(Autoencoder(AutoencoderConfig(kind="kl", resolution=32, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1,
                                                    attn_resolutions=[], z_channels=3, embed_dim=3, norm_groups=4)), ae)
    recipe = {
        "model": {"image_size": 32, "autoencoder": str(ae), "latent_channels": 3, "downsample_factor": 4,
                  "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                           "num_heads": 2},
                  "conditioning": {"context_dim": 16, "conditioners": [{"type": "palette", "dim": 16, "dropout": 0.2}]}},
        "data": {"name": "shapes", "cache_size": 32},
        "steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2, "image_every": 1000,
        "out_dir": str(tmp_path / "run"), "num_threads": 1,
    }
    cfg = tmp_path / "palette.yaml"
    cfg.write_text(json.dumps(recipe))  # JSON is YAML
    res = _ldmkit("train", str(cfg))
    assert res.returncode == 0, res.stderr
    model = tmp_path / "run" / "model.safetensors"
    assert model.is_file()

    # sampling speaks the field's own name
    out = tmp_path / "samples"
    res = _ldmkit("sample", str(model), "--cond", 'palette=["red", [40, 70, 220]]', "--n", "2", "--steps", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "grid.png"]
    assert json.loads((out / "0000.json").read_text())["conditions"] == {"palette": ["red", [40, 70, 220]]}
    res = _ldmkit("sample", str(model), "--cond", 'palette=["orange"]', "--n", "1", "--steps", "1", "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "condition 'palette'" in res.stderr and "unknown colour 'orange'" in res.stderr

    # ...and so does the Python call
    code = (f"import ldmkit; m = ldmkit.load({str(model)!r}); "
            "print(len(m(palette=[['green'], ['cyan', 'yellow']], steps=2, seed=0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.stdout.strip() == "2", out.stderr


def test_fields_are_registered_with_their_provider(palette_installed):
    from ldmkit.registry import get_registry

    reg = get_registry()
    assert reg.field_providers["palette"] == "palette" and reg.field_providers["brightness"] == "template"
    assert palette_installed.get_plugin_manager().records["palette"].fields == ["palette"]


def test_derived_values_are_validated_and_stored_values_win(palette_installed):
    from ldmkit.data.shapes import ShapesWorld
    from ldmkit.fields import sample_value

    scene = ShapesWorld("train")[0]
    colours = sorted({o["colour"] for o in scene.meta["objects"]})
    assert sorted(sample_value(scene, "palette")) == colours
    assert sample_value(scene, "brightness") == pytest.approx(scene.image.mean() / 255, abs=1e-3)
    scene.fields["palette"] = ["cyan"]
    assert sample_value(scene, "palette") == ["cyan"]
    plain = Sample(image=np.zeros((8, 8, 3), np.uint8))
    assert sample_value(plain, "palette") is None  # not a shapes scene: derive says "cannot provide"
    assert plain.get("palette") is None
    with pytest.raises(KeyError, match="'meta' is free-form and not a condition field"):
        plain.get("meta")


def test_a_derive_that_returns_garbage_is_an_error_naming_the_field(fresh_plugins):
    bad = ConditionField("palette", list[str], derive=lambda s: 42)
    plugin = ToyPlugin([ConditionerSpec("level", LevelConfig, Level, Route.VECTOR, fields=(bad,))])
    fresh_plugins.get_plugin_manager(extra=[("toys", plugin)])
    from ldmkit.fields import sample_value

    with pytest.raises(ValueError, match=r"field 'palette' \(plugin 'toys'\): derive returned an invalid value for "
                                         r"sample 3: 42 is invalid"):
        sample_value(Sample(image=np.zeros((4, 4, 3), np.uint8)), "palette", index=3)


def test_a_key_that_is_no_field_is_refused_before_training_naming_every_field(palette_installed):
    from ldmkit.fields import UnknownFieldError, check_keys

    check_keys({"label": ["class"], "palette": ["palette"], "brightness": ["scalar"]})
    with pytest.raises(UnknownFieldError) as info:
        check_keys({"pallete": ["palette"]})
    msg = str(info.value)
    assert "conditioner(s) palette read 'pallete'" in msg and "built-in fields are label, caption" in msg
    assert "brightness, inpaint, palette" in msg


def test_manifests_accept_declared_fields_and_validate_them(palette_installed, tmp_path):
    from ldmkit.data.manifest import ManifestDataset, ManifestError

    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "palette": ["red", [1, 2, 3]], "brightness": 0.5}, {"image": "a.png", "caption": "x"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    data = ManifestDataset(tmp_path / "m.jsonl")
    assert data[0].fields == {"palette": ["red", (1, 2, 3)], "brightness": 0.5}
    assert data[1].fields == {}
    from ldmkit.fields import sample_value

    assert sample_value(data[1], "palette") is None and sample_value(data[1], "brightness") == pytest.approx(280 / 3 / 255, abs=1e-3)

    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "palette": ["orange"], "pallete": ["red"]}))
    with pytest.raises(ManifestError) as info:
        ManifestDataset(tmp_path / "bad.jsonl")
    msg = str(info.value)
    assert "bad.jsonl:1: palette: ['orange'] is invalid" in msg
    assert "pallete: unknown field (allowed: image, caption, label, boxes, segmentation, mask, brightness, inpaint, palette (declared by plugins))" in msg


def test_a_field_cannot_be_built_in_or_badly_named_and_a_bad_type_fails_its_plugin(fresh_plugins):
    for name, message in (("caption", "field 'caption' is built in"), ("meta", "field 'meta' is built in"),
                          ("9lives", "field name '9lives' is invalid")):
        with pytest.raises(ValueError, match=message):
            ConditionField(name, str)  # caught where it is written, before any registry
    spec = ConditionerSpec("level", LevelConfig, Level, Route.VECTOR, fields=(ConditionField("odd", object()),))
    pm = fresh_plugins.PluginManager()
    pm.add_plugin(ToyPlugin([spec]), "toys")
    Registry(pm)
    assert pm.records["toys"].status == "failed"
    assert "value_type is not a type pydantic can validate" in pm.records["toys"].error


def test_true_and_false_are_not_numbers_in_a_field(palette_installed):
    from ldmkit.registry import get_registry

    brightness = get_registry().fields["brightness"]
    assert brightness.validate(1) == 1.0
    for bad in (True, False):
        with pytest.raises(ConditionInputError, match=r"true/false where a number.*allowed: mean image intensity in \[0, 1\]"):
            brightness.validate(bad)
    with pytest.raises(ConditionInputError, match="true/false"):
        get_registry().fields["palette"].validate(["red", [1, True, 3]])


class OtherConfig(LevelConfig):
    type: Literal["other"] = "other"


def test_two_plugins_declaring_one_field_are_marked_and_the_field_withheld(fresh_plugins):
    import dataclasses

    f = ConditionField("tint", float, description="one")
    g = ConditionField("tint", float, description="two")
    a = ToyPlugin([dataclasses.replace(LEVEL, fields=(f,))])
    b = ToyPlugin([ConditionerSpec("other", OtherConfig, Level, Route.VECTOR, fields=(g,))])
    pm = fresh_plugins.PluginManager()
    pm.add_plugin(a, "alpha")
    pm.add_plugin(b, "beta")
    reg = Registry(pm)
    assert "tint" not in reg.fields and reg.field_conflicts == {"tint": ["alpha", "beta"]}
    assert pm.records["alpha"].status == "conflict"
    assert "condition field 'tint' is also provided by plugin 'beta' (not installed)" in pm.records["alpha"].error
    assert reg.names() == ["level", "other"]  # both conditioners still work
    from ldmkit.fields import UnknownFieldError, check_keys

    with pytest.raises(UnknownFieldError, match="condition field 'tint' is provided by more than one plugin"):
        check_keys({"tint": ["level"]}, reg)


def test_a_manifest_names_the_clash_of_a_withheld_field(fresh_plugins, tmp_path):
    import dataclasses

    from ldmkit.data.manifest import ManifestDataset, ManifestError

    fresh_plugins.get_plugin_manager(extra=[
        ("alpha", ToyPlugin([dataclasses.replace(LEVEL, fields=(ConditionField("tint", float),))])),
        ("beta", ToyPlugin([ConditionerSpec("other", OtherConfig, Level, Route.VECTOR, fields=(ConditionField("tint", float),))])),
    ])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "tint": 0.5}))
    with pytest.raises(ManifestError, match=r"m.jsonl:1: tint: condition field 'tint' is provided by more than one "
                                            r"plugin: plugin 'alpha' \(not installed\) and plugin 'beta'"):
        ManifestDataset(tmp_path / "m.jsonl")


def test_as_array_takes_every_array_form_and_refuses_the_rest():
    import numpy as np
    import torch
    from PIL import Image

    from ldmkit import as_array

    grid = [[0, 1], [2, 3]]
    for value in (grid, np.array(grid), torch.tensor(grid), Image.fromarray(np.array(grid, np.uint8))):
        assert as_array(value).tolist() == grid
    for value in ("map.png", {"a": 1}, [[0, 1], [2]], 3, None):
        assert as_array(value) is None
