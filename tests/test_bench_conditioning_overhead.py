"""benchmarks/conditioning_overhead.py still builds its two models from the shipped recipes (it broke once,
unnoticed, when shapes-multi's UNet gained a position code that shapes-sr's lacks), and its timing
accounts for the whole sampling call."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from conditioning_overhead import model_config  # noqa: E402


def test_the_multi_model_takes_every_route_from_the_recipes():
    cfg = model_config("multi")
    kinds = [c["type"] for c in cfg["conditioning"]["conditioners"]]
    assert {"class", "text", "layout", "semantic", "lowres"} <= set(kinds)
    from ldmkit.config import load_yaml

    assert cfg["unet"] == load_yaml(ROOT / "configs/ldm/shapes-multi.yaml")["model"]["unet"]  # whatever shapes-sr's is


def test_a_tiny_run_splits_the_wall_time():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/conditioning_overhead.py"), "--skip-memory",
                          "--batch", "2", "--steps", "2", "--repeats", "1"], capture_output=True, text=True,
                         timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for kind in ("multi", "class"):
        r = result["sampling"][kind]
        assert 0 < r["unet_s"] < r["wall_s"] and 0 <= r["overhead"] < 1
        assert r["encode_s"] > 0 and r["outside_s"] >= r["encode_s"]
    assert result["conditioners"]["multi"] == ["class", "text", "layout", "semantic", "lowres", "noise_level"]
