"""The `ldmkit` command: version, quickstart, wiring, and clean errors (no tracebacks)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ldmkit.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_version():
    res = run("--version")
    assert res.returncode == 0 and res.stdout.startswith("ldmkit 0.")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise AssertionError("no Chromium found: scripts/setup.sh installs the Debian package `chromium` (apt-get)")


def browser_check(page: Path, screenshot: Path) -> tuple[int, int]:
    """Open ``page`` in headless Chromium: (images decoded, images on the page), and a screenshot."""
    flags = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    shot = subprocess.run([*flags, "--window-size=1200,2400", f"--screenshot={screenshot}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), shot.stderr[-2000:]
    found = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert found, "the page's load check did not run:\n" + dom[:2000]
    return int(found.group(1)), int(found.group(2))


def test_quickstart_shows_plugins_and_wiring_and_writes_a_gallery(tmp_path):
    res = run("quickstart", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "template" in res.stdout and "UNet: in_channels=4" in res.stdout
    desc = json.loads((tmp_path / "wiring.json").read_text())
    assert desc["unet"]["context_tokens"] == 1

    from ldmkit.api import model_kind
    from ldmkit.zoo import list_zoo

    page = tmp_path / "index.html"
    text = page.read_text()
    for name in list_zoo():  # every zoo model, its card's eval command
        assert f"zoo:{name}" in text, name
    for name in [n for n in list_zoo() if model_kind(f"zoo:{n}") == "latent_diffusion"]:
        assert f'src="samples-{name}.png"' in text and f"ldmkit eval zoo:{name}" in text, name
    loaded, total = browser_check(page, tmp_path / "gallery.png")
    assert total == len(list(tmp_path.glob("*.png"))) - 1 and loaded == total  # every PNG but the screenshot
    from PIL import Image
    import numpy as np

    shot = np.asarray(Image.open(tmp_path / "gallery.png").convert("RGB")).astype(int)
    grey = (np.abs(shot - shot.mean(-1, keepdims=True)).max(-1) < 8)  # white, black, grey text and backgrounds
    assert (~grey).mean() > 0.02, "the screenshot shows (almost) no coloured pixels: the pictures did not render"

    # the check can fail: the same page with one picture gone
    (tmp_path / "shapes-preview.png").unlink()
    loaded, total = browser_check(page, tmp_path / "broken.png")
    assert loaded == total - 1


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
