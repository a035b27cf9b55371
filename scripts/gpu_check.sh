#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "The GPU check"). On a machine with an NVIDIA GPU: sets
# up a virtualenv with the GPU requirements (requirements/gpu.txt), builds the benchmark's
# model, and prints the model stage's slices/s, P002 end to end (warm), the decode share,
# the effect of the batch size (8, 16, 32), decode throughput per worker count, the
# three-series overlap and the GPU's memory (TensorFlow's allocator peak and nvidia-smi).
#
# Usage: scripts/gpu_check.sh [--dry-run] [--venv DIR] [--no-install]
#                             [--batch-sizes 8,16,32] [--repeats 3]
#   --dry-run      check the plan (files, data, options, the benchmark's flags) and print
#                  it; needs no GPU, installs and runs nothing (tests/test_gpu_check.py)
#   --venv DIR     the virtualenv to use, created when missing (default: .venv-gpu)
#   --no-install   use the virtualenv as it is (a machine without a package index)
# Environment: PYTHON (default python3.11), COVIDCT_SHARED_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
venv=.venv-gpu
install=1
batch_sizes=8,16,32
repeats=3
fail() { echo "gpu_check: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --venv) [ $# -ge 2 ] || fail "--venv needs a directory"; venv=$2; shift ;;
    --no-install) install=0 ;;
    --batch-sizes) [ $# -ge 2 ] || fail "--batch-sizes needs a list"; batch_sizes=$2; shift ;;
    --repeats) [ $# -ge 2 ] || fail "--repeats needs a number"; repeats=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown option: $1 (see --help)" ;;
  esac
  shift
done

# --- check the plan --------------------------------------------------------------------
[[ $batch_sizes =~ ^[1-9][0-9]{0,2}(,[1-9][0-9]{0,2})*$ ]] \
  || fail "--batch-sizes must be a comma-separated list of batch sizes 1-256: $batch_sizes"
for b in ${batch_sizes//,/ }; do
  [ "$b" -le 256 ] || fail "batch size $b is over the service's limit of 256"
done
[[ $repeats =~ ^[1-9][0-9]?$ ]] || fail "--repeats must be a number 1-99: $repeats"
grep -q '^tensorflow\[and-cuda\]==' requirements/gpu.txt \
  || fail "requirements/gpu.txt does not pin tensorflow[and-cuda]"
[ -f benchmarks/bench_pipeline.py ] || fail "benchmarks/bench_pipeline.py is missing"
data=${COVIDCT_SHARED_DATA:-../shared/data}
compgen -G "$data/covid-ct-md/P002/*.dcm" >/dev/null \
  || fail "P002 not found under $data/covid-ct-md (set COVIDCT_SHARED_DATA)"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
command -v "$PYTHON" >/dev/null || fail "no Python 3.11 ($PYTHON) to create $venv with"

py=$venv/bin/python
bench=(benchmarks/bench_pipeline.py --gpu-check --batch-sizes "$batch_sizes" --repeats "$repeats")
steps=(
  "nvidia-smi -L   # at least one NVIDIA GPU and its driver"
)
[ -x "$py" ] || steps+=("$PYTHON -m venv $venv")
if [ "$install" = 1 ]; then
  steps+=("$py -m pip install -r requirements/gpu.txt -e .[train]")
fi
steps+=(
  "$py -c 'import tensorflow as tf; assert tf.config.list_physical_devices(\"GPU\")'"
  "nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500   # sampled meanwhile"
  "$py ${bench[*]}"
)
echo "gpu_check plan (P002 from $data):"
for i in "${!steps[@]}"; do echo "  $((i + 1)). ${steps[$i]}"; done

if [ "$dry_run" = 1 ]; then
  # The benchmark must take the flags the plan passes (any Python with the project will do).
  checker=$py
  [ -x "$checker" ] || checker=.venv/bin/python
  if [ -x "$checker" ]; then
    help=$("$checker" benchmarks/bench_pipeline.py --help)
    for flag in --gpu-check --batch-sizes --repeats; do
      grep -q -- "$flag" <<<"$help" || fail "benchmarks/bench_pipeline.py lacks $flag"
    done
    echo "dry run: the plan checks out (benchmark flags checked with $checker); nothing run"
  else
    echo "dry run: the plan checks out (no Python environment here to check the benchmark's flags)"
  fi
  exit 0
fi

# --- run it ----------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this check needs an NVIDIA GPU"
nvidia-smi -L | grep -q '^GPU ' || fail "nvidia-smi lists no GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
[ -x "$py" ] || "$PYTHON" -m venv "$venv"
if [ "$install" = 1 ]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -r requirements/gpu.txt -e ".[train]"
fi
"$py" -c 'import tensorflow as tf; assert tf.config.list_physical_devices("GPU"), "TensorFlow sees no GPU"'

samples=$(mktemp)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$samples" &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true; rm -f "$samples"' EXIT
TF_CPP_MIN_LOG_LEVEL=2 COVIDCT_SHARED_DATA=$data "$py" "${bench[@]}"
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
peak=$(sort -n "$samples" | tail -1)
echo "GPU memory used, peak over the run (nvidia-smi, every process on the GPU): ${peak:-?} MiB"
