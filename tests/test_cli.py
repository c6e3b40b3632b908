"""The `ldmkit` command: version, quickstart, wiring, and clean errors (no tracebacks)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_version():
    res = run("--version")
    assert res.returncode == 0 and res.stdout.startswith("ldmkit 0.")


def test_quickstart_shows_plugins_and_wiring(tmp_path):
    res = run("quickstart", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "template" in res.stdout and "UNet: in_channels=4" in res.stdout
    desc = json.loads((tmp_path / "wiring.json").read_text())
    assert desc["unet"]["context_tokens"] == 1


def test_wiring_json():
    res = run("wiring", str(REPO / "configs/ldm/compose-demo.yaml"), "--json")
    assert res.returncode == 0
    assert json.loads(res.stdout)["latent_shape"] == [4, 8, 8]


def test_bad_config_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("conditioning:\n  conditioners:\n    - type: texxt\n")
    res = run("wiring", str(bad))
    assert res.returncode == 2
    assert "no conditioner 'texxt'; installed:" in res.stderr and "Traceback" not in res.stderr
