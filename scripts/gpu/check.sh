#!/usr/bin/env bash
# The GPU check on a fresh device machine: install the carried wheels (.whl/, from
# scripts/fetch_gpu_wheels.sh) into /tmp/site, put them on PYTHONPATH, run scripts/gpu_check.py.
#   bash scripts/gpu_check.sh --plan 1 --out "$OUT"      (docs/gpu.md: the device calls, in order)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${FGPT_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  # The image's own flax unless it is outside the 0.12 series this code is tested with.
  if compgen -G ".whl/optional/flax-*.whl" >/dev/null &&
     ! "$PY" -c 'import flax, sys; sys.exit(not flax.__version__.startswith("0.12."))' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/optional/flax-*.whl
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no .whl/ here: grain and tensorboardX must already be installed" >&2
fi
exec "$PY" scripts/gpu_check.py "$@"
