#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the CPU TensorFlow and the project; idempotent.
# Usage: scripts/setup-venv.sh [extras]   e.g. "test,train"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras=${1:-}
.venv/bin/python -m pip install -q -r requirements/cpu.txt -e ".${extras:+[$extras]}"
