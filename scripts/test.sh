#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Tests run Ray without token auth (a throwaway local cluster); everything else keeps it on.
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q -ra --durations=40 "$@"
