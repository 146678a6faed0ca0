#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite. CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Tests run Ray without token auth (a throwaway local cluster); everything else keeps it on.
export RAY_AUTH_MODE=disabled
# Two test processes (pytest-xdist; tests/conftest.py keeps a file's tests on one): most of the
# suite is Ray starting processes and tests waiting on them, so one process leaves 2 cores half idle.
# CXRRAY_TEST_PROCESSES=0 runs in one process (as does `-n 0` given after).
exec .venv/bin/python -m pytest -q -ra --durations=40 -n "${CXRRAY_TEST_PROCESSES:-2}" "$@"
