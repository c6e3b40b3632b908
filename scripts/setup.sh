#!/usr/bin/env bash
# Installs what ldmkit needs on a fresh machine: Debian packages (when apt-get is there), a virtual
# environment in .venv (unless one is active), the core and every plugin under plugins/ (editable).
# Usage: source-free; called by scripts/run.sh and scripts/test.sh.  EXTRAS=test adds test deps.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the emoji data set renders Noto Color Emoji.
if [ ! -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "[setup] installing Debian package fonts-noto-color-emoji"
  ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null) \
    || echo "[setup] warning: could not install fonts-noto-color-emoji; the emoji data set will be unavailable" >&2
fi

# Chromium (headless) checks the quickstart's HTML gallery in the tests.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "[setup] installing Debian package chromium (headless check of the HTML gallery)"
  ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] warning: could not install chromium; the gallery's browser test will fail" >&2
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  PY="${PYTHON:-python3}"
  [ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$PY" -m venv .venv; }
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

extras="${EXTRAS:-data}"
plugins=()
for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
echo "[setup] pip install ldmkit[$extras] and $((${#plugins[@]} / 2)) plugins into $(python -c 'import sys; print(sys.prefix)')"
python -m pip install -q --disable-pip-version-check -e ".[$extras]" "${plugins[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
python -c "import ldmkit, torch; print(f'[setup] ldmkit {ldmkit.__version__}, torch {torch.__version__}')"
