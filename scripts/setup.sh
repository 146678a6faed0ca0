#!/usr/bin/env bash
# Sets up cxrray on a fresh machine: a virtualenv in .venv with the package and its deps.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --test   # + test deps and Debian chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision first and pinned: pip takes them from the local wheel cache where there is
# one, and a range left open would pull a multi-GB CUDA build from the index.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
  if [ ! -x /usr/bin/chromium ]; then
    echo "== installing Debian chromium for the browser test"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
      || echo "!! chromium could not be installed; the browser test will skip"
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
echo "== cxrray installed: $(.venv/bin/cxrray --help | head -1)"
