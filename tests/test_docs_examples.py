"""The example plugins in the hook spec's docstring and in docs/writing-a-plugin.md really work."""

import re
import textwrap
from pathlib import Path

import ldmkit.hookspecs
from ldmkit.testing import check_conditioner

REPO = Path(__file__).resolve().parent.parent


def _run_example(code: str):
    namespace: dict = {}
    exec(compile(code, "<example>", "exec"), namespace)
    spec = namespace["SPEC"] if "SPEC" in namespace else namespace["ldmkit_conditioners"]()[0]
    # the examples are exec'd here, not installed: their discovery check is skipped explicitly
    return check_conditioner(spec, invalid_inputs=[-0.5, 2.0, "dark", None, True], installed=False)


def test_hookspec_docstring_example_passes_the_kit():
    doc = ldmkit.hookspecs.ldmkit_conditioners.__doc__
    code = textwrap.dedent(doc.split("vector::", 1)[1])
    assert len(_run_example(code)) == 11  # every check but discovery (not installed)


def test_writing_a_plugin_example_passes_the_kit():
    text = (REPO / "docs/writing-a-plugin.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "class ContrastConfig" in b)
    assert len(_run_example(code)) == 11  # every check but discovery (not installed)


def test_autoencoders_doc_snippet_writes_its_picture(tmp_path, monkeypatch):
    text = (REPO / "docs/autoencoders.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "photos-reconstructions.png" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs/autoencoders.md>", "exec"), {})
    from PIL import Image

    assert Image.open(tmp_path / "photos-reconstructions.png").size[0] > 10 * 32 * 4


def test_writing_a_plugin_field_example_runs_and_prints_what_it_says():
    text = (REPO / "docs/writing-a-plugin.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "scene_palette" in b)
    printed = []
    exec(compile(block, "<docs/writing-a-plugin.md>", "exec"), {"print": printed.append})
    claimed = re.search(r"# (\[.*\])", block).group(1)
    assert repr(printed[0]) == claimed


def test_writing_a_plugin_contrast_field_derives_from_any_sample():
    text = (REPO / "docs/writing-a-plugin.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class ContrastConfig" in b)
    namespace: dict = {}
    exec(compile(code, "<example>", "exec"), namespace)
    from ldmkit.data.shapes import ShapesWorld

    field = namespace["CONTRAST"]
    value = field.validate(field.derive(ShapesWorld("train")[0]))
    assert 0.0 < value < 1.0
