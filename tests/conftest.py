import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import ldmkit  # noqa: E402  before torch is imported: chooses how OpenMP threads wait (ldmkit/_threads.py)
sys.path.insert(0, str(Path(__file__).parent))  # tests/toys.py

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A clean plugin manager and registry before and after the test; plugin env vars cleared."""
    from ldmkit import plugins

    monkeypatch.delenv("LDMKIT_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("LDMKIT_STRICT_PLUGINS", raising=False)
    plugins.reset()
    yield plugins
    plugins.reset()
