"""The one hard rule: nothing under ldmkit/ imports a plugin package (and plugins use only the public API)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plugin_modules() -> set[str]:
    mods = set()
    for pyproject in REPO.glob("plugins/*/pyproject.toml"):
        for m in re.findall(r'^\s*[\w.-]+\s*=\s*"([\w.]+)', pyproject.read_text().split("[project.entry-points.ldmkit]")[1], re.M):
            mods.add(m.split(".")[0])
        for pkg in (pyproject.parent / "src").glob("*/__init__.py"):
            mods.add(pkg.parent.name)
    return mods


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in {"import_module", "__import__"}:
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def test_plugins_are_known():
    assert {"ldmkit_plugin_template", "ldmkit_class"} <= plugin_modules()


def test_core_never_imports_a_plugin():
    plugins = plugin_modules()
    offenders = []
    for path in sorted((REPO / "ldmkit").rglob("*.py")):
        for name in imports_of(path):
            if name.split(".")[0] in plugins:
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_plugins_import_only_the_public_api():
    offenders = []
    public = {"ldmkit", "ldmkit.testing"}
    for path in sorted(REPO.glob("plugins/*/src/**/*.py")):
        for name in imports_of(path):
            if name.startswith("ldmkit.") and name not in public and not name.startswith("ldmkit_"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_the_check_would_catch_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ldmkit_class import SPEC\n")
    assert "ldmkit_class" in imports_of(bad) and "ldmkit_class" in plugin_modules()
