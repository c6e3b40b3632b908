"""Plugin loading and the registry: validation, isolation of broken plugins, conflicts, env vars."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.dists import BAD_SPEC, BROKEN_AT_IMPORT, DUPLICATE_CLASS, MISSPELLED_HOOK, NO_HOOK, make_dist
from ldmkit import ConditionerSpec, Route, hookimpl
from ldmkit.registry import ConditionerConflictError, Registry, UnknownConditionerError
from ldmkit.types import normalize_name
from toys import LEVEL, WORDS, Level, LevelConfig, ToyPlugin

REPO = Path(__file__).resolve().parent.parent


def registry_with(fresh_plugins, *plugins):
    pm = fresh_plugins.PluginManager()
    for name, obj in plugins:
        pm.add_plugin(obj, name)
    return pm, Registry(pm)


def test_specs_are_collected_and_attributed(fresh_plugins):
    pm, reg = registry_with(fresh_plugins, ("toys", ToyPlugin()))
    assert reg.names() == ["level", "map", "words"]
    assert reg.providers["words"] == "toys"
    assert pm.records["toys"].conditioners == ["words", "map", "level"]


def test_names_are_normalized():
    spec = ConditionerSpec(" Low-Res ", LevelConfig, Level, "vector")
    assert spec.name == "low_res" and spec.route is Route.VECTOR


def test_a_name_clash_withholds_only_that_name(fresh_plugins):
    pm, reg = registry_with(fresh_plugins, ("alpha", ToyPlugin([WORDS])), ("beta", ToyPlugin([WORDS, LEVEL])))
    assert reg.names() == ["level"] and reg.conflicts == {"words": ["alpha", "beta"]}
    for me, other in (("alpha", "beta"), ("beta", "alpha")):
        assert pm.records[me].status == "conflict"
        assert f"'words' is also provided by plugin '{other}' (not installed)" in pm.records[me].error
        assert "LDMKIT_DISABLE_PLUGINS=alpha or LDMKIT_DISABLE_PLUGINS=beta" in pm.records[me].error
    assert reg.build({"type": "level"}).encode([0.5]).value.shape == (1, 6)  # beta's other conditioner works
    with pytest.raises(ConditionerConflictError, match=r"'words' is provided by more than one plugin: plugin 'alpha'.*and plugin 'beta'.*LDMKIT_DISABLE_PLUGINS=alpha"):
        reg.get("words")


def test_a_config_using_a_clashing_name_is_refused_naming_both(fresh_plugins):
    from ldmkit.config import ConfigError, load_config

    fresh_plugins.get_plugin_manager(extra=[("alpha", ToyPlugin([WORDS])), ("beta", ToyPlugin([WORDS, LEVEL]))])
    with pytest.raises(ConfigError, match=r"conditioners.0.type: conditioner 'words' is provided by more than one plugin"):
        load_config({"conditioning": {"conditioners": [{"type": "words"}]}})
    assert load_config({"conditioning": {"conditioners": [{"type": "level"}]}}).conditioning.conditioners[0].type == "level"
    assert load_config({}).conditioning.conditioners == []  # a model without conditioners is untouched


def test_a_name_clash_raises_in_strict_mode(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(fresh_plugins.PluginError, match="'words' is also provided by"):
        registry_with(fresh_plugins, ("alpha", ToyPlugin([WORDS])), ("beta", ToyPlugin([WORDS])))


class Raises:
    @hookimpl
    def ldmkit_conditioners(self):
        raise RuntimeError("boom")


class ReturnsJunk:
    @hookimpl
    def ldmkit_conditioners(self):
        return [WORDS, 42]


class BadLiteral:
    @hookimpl
    def ldmkit_conditioners(self):
        return [ConditionerSpec("other_name", LevelConfig, Level, Route.VECTOR)]


class BadName:
    @hookimpl
    def ldmkit_conditioners(self):
        return [ConditionerSpec("9lives", LevelConfig, Level, Route.VECTOR)]


class WrongRoute:
    @hookimpl
    def ldmkit_conditioners(self):
        return [ConditionerSpec("level", LevelConfig, Level, Route.TOKENS)]


class BadHookSignature:
    @hookimpl
    def ldmkit_conditioners(self, unexpected_argument):
        return []


@pytest.mark.parametrize(
    "plugin, message",
    [
        (Raises(), "RuntimeError: boom"),
        (ReturnsJunk(), "ConditionerSpec objects, got int"),
        (BadLiteral(), "Literal['other_name']"),
        (BadName(), "'9lives' is invalid"),
        (WrongRoute(), "declares route tokens"),
        (BadHookSignature(), "unexpected_argument"),
    ],
    ids=["raises", "junk", "literal", "name", "route", "signature"],
)
def test_spec_violations_mark_only_that_plugin_failed(fresh_plugins, plugin, message):
    pm, reg = registry_with(fresh_plugins, ("good", ToyPlugin([WORDS])), ("bad", plugin))
    assert pm.records["bad"].status == "failed"
    assert message in pm.records["bad"].error
    assert pm.records["good"].status == "active" and reg.names() == ["words"]


def test_strict_mode_raises(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(fresh_plugins.PluginError, match="boom"):
        registry_with(fresh_plugins, ("bad", Raises()))


def test_disabled_plugins_are_blocked(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_DISABLE_PLUGINS", "Toys, other")
    pm, reg = registry_with(fresh_plugins, ("toys", ToyPlugin()))
    assert pm.records["toys"].status == "blocked" and reg.names() == []


def test_unknown_conditioner_lists_installed(fresh_plugins):
    _, reg = registry_with(fresh_plugins, ("toys", ToyPlugin()))
    with pytest.raises(UnknownConditionerError, match=r"no conditioner 'text'; installed: level, map, words"):
        reg.get("text")


def test_manager_is_built_on_demand_and_resettable(fresh_plugins):
    code = "import ldmkit, ldmkit.plugins as p, ldmkit.registry as r; print(p._MANAGER is None, r._REGISTRY is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
    first = fresh_plugins.get_plugin_manager()
    assert fresh_plugins.get_plugin_manager() is first
    fresh_plugins.reset()
    assert fresh_plugins.get_plugin_manager() is not first


def _ldmkit(args, extra_path=None, **env):
    full_env = {**os.environ, **env}
    for k in ("LDMKIT_DISABLE_PLUGINS", "LDMKIT_STRICT_PLUGINS"):
        if k not in env:
            full_env.pop(k, None)
    if extra_path:
        full_env["PYTHONPATH"] = os.pathsep.join([str(extra_path), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True, env=full_env)


def _by_name(stdout):
    data = json.loads(stdout)
    assert isinstance(data, list)
    for row in data:
        assert set(row) >= {"name", "version", "status", "conditioners", "error"}
        assert row["status"] in {"active", "blocked", "failed", "conflict"}
    return {row["name"]: row for row in data}


def test_template_is_discovered_through_its_entry_point():
    res = _ldmkit(["plugins", "--json"])
    assert res.returncode == 0, res.stderr
    rows = _by_name(res.stdout)
    assert rows["template"]["status"] == "active"
    assert rows["template"]["conditioners"] == ["scalar"] and rows["template"]["error"] is None
    assert rows["template"]["version"] == "0.1.0"


def test_disable_env_blocks_the_template():
    rows = _by_name(_ldmkit(["plugins", "--json"], LDMKIT_DISABLE_PLUGINS="template").stdout)
    assert rows["template"]["status"] == "blocked" and rows["template"]["conditioners"] == []


def test_broken_plugin_is_listed_failed_and_others_work(tmp_path):
    path = make_dist(tmp_path, "ldmkit-broken", "broken", "ldmkit_broken_fixture", BROKEN_AT_IMPORT)
    res = _ldmkit(["plugins", "--json"], extra_path=path)
    assert res.returncode == 0, res.stderr
    rows = _by_name(res.stdout)
    assert rows["broken"]["status"] == "failed"
    assert "unobtainium" in rows["broken"]["error"]
    assert rows["template"]["status"] == "active"
    # ...and the template still builds and runs in that environment
    code = "from ldmkit import get_registry; r = get_registry(); print(r.build({'type': 'scalar'}).encode([0.5]).value.shape)"
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "torch.Size([1, 64])" in out.stdout, out.stderr


def test_strict_mode_makes_the_command_fail(tmp_path):
    path = make_dist(tmp_path, "ldmkit-broken", "broken", "ldmkit_broken_fixture", BROKEN_AT_IMPORT)
    res = _ldmkit(["plugins", "--json"], extra_path=path, LDMKIT_STRICT_PLUGINS="1")
    assert res.returncode != 0
    assert "unobtainium" in res.stderr and "Traceback" not in res.stderr


def test_spec_violation_through_entry_point_is_failed(tmp_path):
    path = make_dist(tmp_path, "ldmkit-badspec", "badspec", "ldmkit_badspec_fixture", BAD_SPEC)
    rows = _by_name(_ldmkit(["plugins", "--json"], extra_path=path).stdout)
    assert rows["badspec"]["status"] == "failed" and "ConditionerSpec" in rows["badspec"]["error"]


def test_conflicting_installed_plugins_are_marked_and_only_their_name_is_refused(tmp_path):
    """A second distribution providing `class`: the listing works and says so; models that do not use
    `class` load; one that does is refused naming both providers and the variable that resolves it."""
    path = make_dist(tmp_path, "ldmkit-dupe", "dupe", "ldmkit_dupe_fixture", DUPLICATE_CLASS)
    res = _ldmkit(["plugins", "--json"], extra_path=path)
    assert res.returncode == 0, res.stderr
    rows = _by_name(res.stdout)
    for me, other in (("class", "dupe"), ("dupe", "class")):
        assert rows[me]["status"] == "conflict"
        assert f"conditioner 'class' is also provided by plugin '{other}' (ldmkit-{other})" in rows[me]["error"]
    assert rows["template"]["status"] == "active" and rows["template"]["error"] is None
    assert "warning: conditioner 'class' is provided by more than one plugin" in res.stderr

    env = {**os.environ, "PYTHONPATH": str(path)}
    env.pop("LDMKIT_DISABLE_PLUGINS", None)
    code = "import ldmkit; m = ldmkit.load('zoo:shapes-uncond'); print(type(m).__name__, m.stack.names)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "LatentDiffusion []" in out.stdout, out.stderr
    res = _ldmkit(["sample", "zoo:shapes-class", "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")], extra_path=path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "plugin 'class' (ldmkit-class) and plugin 'dupe' (ldmkit-dupe)" in res.stderr
    assert "is the plugin that provides it installed" not in res.stderr
    assert "LDMKIT_DISABLE_PLUGINS=class or LDMKIT_DISABLE_PLUGINS=dupe" in res.stderr
    res = _ldmkit(["sample", "zoo:shapes-class", "--cond", "label=3", "--n", "1", "--steps", "1", "--out",
                   str(tmp_path / "s")], extra_path=path, LDMKIT_DISABLE_PLUGINS="dupe")
    assert res.returncode == 0, res.stderr


HOOKLESS = {
    "misspelled": (MISSPELLED_HOOK, "unknown ldmkit hook ldmkit_conditioner (did you mean ldmkit_conditioners?)"),
    "nohook": (NO_HOOK, "implements no ldmkit hook; expected ldmkit_conditioners(...)"),
}


@pytest.mark.parametrize("kind", sorted(HOOKLESS))
def test_plugin_without_a_known_hook_is_failed_not_active(tmp_path, kind):
    source, message = HOOKLESS[kind]
    path = make_dist(tmp_path, f"ldmkit-{kind}", kind, f"ldmkit_{kind}_fixture", source)
    res = _ldmkit(["plugins", "--json"], extra_path=path)
    assert res.returncode == 0, res.stderr
    rows = _by_name(res.stdout)
    assert rows[kind]["status"] == "failed" and rows[kind]["conditioners"] == []
    assert message in rows[kind]["error"]
    assert rows["template"]["status"] == "active" and rows["template"]["conditioners"] == ["scalar"]


@pytest.mark.parametrize("kind", sorted(HOOKLESS))
def test_plugin_without_a_known_hook_fails_strict_mode(tmp_path, kind):
    source, message = HOOKLESS[kind]
    path = make_dist(tmp_path, f"ldmkit-{kind}", kind, f"ldmkit_{kind}_fixture", source)
    res = _ldmkit(["plugins", "--json"], extra_path=path, LDMKIT_STRICT_PLUGINS="1")
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr


class Misspelled:
    @hookimpl
    def ldmkit_conditioner(self):
        return [WORDS]


class Unmarked:
    def ldmkit_conditioners(self):
        return [WORDS]


class OptionalExtra:
    """An optionalhook for a hook this ldmkit does not know is allowed (as in pluggy's check_pending)."""

    @hookimpl
    def ldmkit_conditioners(self):
        return [LEVEL]

    @hookimpl(optionalhook=True)
    def ldmkit_future_hook(self):
        return None


def test_hookless_plugins_fail_in_process_and_are_unregistered(fresh_plugins):
    pm, reg = registry_with(
        fresh_plugins, ("good", ToyPlugin([WORDS])), ("typo", Misspelled()), ("unmarked", Unmarked()),
        ("optional", OptionalExtra()),
    )
    assert pm.records["typo"].status == "failed" and "ldmkit_conditioner " in pm.records["typo"].error
    assert "not decorated with @ldmkit.hookimpl" in pm.records["unmarked"].error
    assert pm.records["optional"].status == "active"
    assert pm.records["good"].status == "active" and reg.names() == ["level", "words"]
    assert {p for p in pm.get_plugins()} == {pm.records["good"].plugin, pm.records["optional"].plugin}
    pm.check_pending()  # nothing unknown left registered


def test_hookless_plugin_raises_in_strict_mode(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(fresh_plugins.PluginError, match="implements no ldmkit hook"):
        registry_with(fresh_plugins, ("empty", object()))


def test_first_party_list_matches_the_plugins_folder(fresh_plugins):
    """Schemas are generated from FIRST_PARTY_DISTRIBUTIONS only: every plugins/*/ distribution must be in it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    dists, entry_points = set(), set()
    for pyproject in sorted((REPO / "plugins").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        eps = project.get("entry-points", {}).get(fresh_plugins.ENTRY_POINT_GROUP, {})
        assert eps, f"{pyproject} declares no [project.entry-points.{fresh_plugins.ENTRY_POINT_GROUP}]"
        dists.add(normalize_name(project["name"]))
        entry_points |= {normalize_name(n) for n in eps}
    listed = {normalize_name(d) for d in fresh_plugins.FIRST_PARTY_DISTRIBUTIONS}
    assert listed == dists, "ldmkit/plugins.py FIRST_PARTY_DISTRIBUTIONS is out of date with plugins/*/pyproject.toml"
    # ...and the manager that schemas are built from loads exactly those plugins' entry points, all active
    pm = fresh_plugins.get_plugin_manager(first_party_only=True)
    assert set(pm.records) == entry_points
    assert {r.status for r in pm.records.values()} == {"active"}
