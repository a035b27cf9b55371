#!/usr/bin/env bash
# The checks CI runs (.ci/run calls this), CPU only, in order, stopping at the first that fails:
#   1. ruff over app models tests scripts benchmarks
#   2. mypy, strict, on app/ (its settings are in pyproject.toml)
#   3. pytest with line coverage of app/, which must reach 90 %, on one pytest-xdist worker
#      per logical core (COVIDCT_TEST_WORKERS: another count; 0: in this one process), each
#      taking whole test files, so that a module's fixtures are built once
# Sets up .venv first (scripts/setup-venv.sh). Extra arguments go to pytest; for a partial
# run add --no-cov, since a subset of the tests cannot reach the coverage floor:
#   scripts/test.sh -q --no-cov -n 0 tests/test_k8s.py
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Coverage data under var/ (ignored by git), not as .coverage in the tree.
mkdir -p var
export COVERAGE_FILE=${COVERAGE_FILE:-var/.coverage}
scripts/setup-venv.sh test,train

echo "== ruff" >&2
.venv/bin/ruff check app models tests scripts benchmarks
echo "== mypy (strict, app/)" >&2
.venv/bin/mypy
echo "== pytest (coverage of app/, floor 90 %)" >&2
status=0
.venv/bin/python -m pytest -n "${COVIDCT_TEST_WORKERS:-logical}" --dist loadfile --cov=app --cov-report=term --cov-fail-under=90 "$@" || status=$?
case "$status" in
  0) ;;
  5) echo "pytest collected no test: nothing was checked (exit 5)" >&2 ;;
  *) echo "pytest failed (exit $status)" >&2 ;;
esac
exit "$status"
