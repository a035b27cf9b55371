#!/usr/bin/env bash
# Sets up and runs the linters and the test suite (CPU only). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test,train
.venv/bin/ruff check app models tests scripts benchmarks
.venv/bin/python -m pytest "$@"
