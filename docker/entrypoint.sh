#!/bin/sh
# covidct container entrypoint: two optional checks before the command (the service by
# default, see CMD in docker/Dockerfile) replaces this shell.
#
#   COVIDCT_REQUIRE_API_KEYS=1     refuse to start unless COVIDCT_API_KEYS is a JSON list
#                                  of non-empty keys (docker-compose.yml sets it: API
#                                  keys are on in the compose deployment).
#   COVIDCT_BUILD_DEFAULT_MODEL=1  when COVIDCT_MODEL_DIR holds no SavedModel, build the
#                                  UNTRAINED default model there first (about a minute).
#                                  For trying the plumbing only: its diagnoses are
#                                  meaningless, and /health stays 503 unless
#                                  COVIDCT_ALLOW_UNTRAINED=true. Production mounts
#                                  trained weights and leaves this off.
set -eu

log() { echo "covidct-entrypoint: $*" >&2; }

if [ "${COVIDCT_REQUIRE_API_KEYS:-0}" = "1" ]; then
  if ! python3 - <<'EOF'
import json
import os
import sys

raw = os.environ.get("COVIDCT_API_KEYS", "")
try:
    keys = json.loads(raw)
except ValueError:
    keys = None
ok = isinstance(keys, list) and keys and all(isinstance(k, str) and k.strip() for k in keys)
if not ok:
    sys.exit(
        "COVIDCT_REQUIRE_API_KEYS=1 but COVIDCT_API_KEYS is not a JSON list of non-empty "
        "keys (for example [\"k3y-one\", \"k3y-two\"])"
    )
EOF
  then
    log "refusing to start without API keys"
    exit 78
  fi
fi

model_dir="${COVIDCT_MODEL_DIR:-/models/current}"
if [ "${COVIDCT_BUILD_DEFAULT_MODEL:-0}" = "1" ] && [ ! -f "$model_dir/saved_model.pb" ]; then
  if [ -d "$model_dir" ] && [ -n "$(ls -A "$model_dir")" ]; then
    log "$model_dir is not empty but holds no saved_model.pb; not touching it"
    exit 1
  fi
  # An empty directory is replaced: the export is written beside it and renamed into place.
  if [ -d "$model_dir" ] && ! rmdir "$model_dir" 2>/dev/null; then
    log "cannot replace the empty $model_dir (a mount point?): mount its parent instead"
    exit 1
  fi
  parent="$(dirname "$model_dir")"
  if [ ! -w "$parent" ]; then
    log "cannot build the default model: $parent is not writable by uid $(id -u)" \
      "(mount the model volume read-write and owned by that uid)"
    exit 1
  fi
  log "no SavedModel in $model_dir: building the UNTRAINED default model" \
    "(COVIDCT_BUILD_DEFAULT_MODEL=1); its diagnoses are meaningless"
  case "${COVIDCT_ALLOW_UNTRAINED:-}" in
    1 | [Tt][Rr][Uu][Ee] | [Yy][Ee][Ss] | [Oo][Nn]) ;;
    *) log "COVIDCT_ALLOW_UNTRAINED is not true: /health will stay 503 with these weights" ;;
  esac
  python3 -m models build-default --out "$model_dir"
fi

exec "$@"
