#!/usr/bin/env bash
# The README's main command: set up, then run the quickstart on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
ldmkit quickstart --out out/quickstart "$@"
