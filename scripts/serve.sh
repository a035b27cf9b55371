#!/usr/bin/env bash
# Sets up and runs the service on this machine's CPU with the default model.
# The default model is the real FPN-ResNet50V2 with UNTRAINED weights (see README): it is
# created under var/models/default on first run (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh train
export COVIDCT_MODEL_DIR=${COVIDCT_MODEL_DIR:-var/models/default}
if [ ! -f "$COVIDCT_MODEL_DIR/assets/model_card.json" ]; then
  .venv/bin/python -m models build-default --out "$COVIDCT_MODEL_DIR"
fi
exec .venv/bin/uvicorn --factory app.main:app_factory \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --no-access-log
