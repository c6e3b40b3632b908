#!/usr/bin/env bash
# The README's test command: set up with test dependencies, then run the whole suite (slow tests too).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m pytest "$@"
