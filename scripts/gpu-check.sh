#!/usr/bin/env bash
# Every CUDA path in one short run (train, serve with batching, an HTTP attack, bfloat16
# autocast, the serving benchmark), one line per path with its figure, then the device.
# Extra arguments go to benchmarks/gpu_check.py: --device cpu (the tiny smoke test CI runs),
# --timeout SECONDS per path (default 75), --workdir DIR (keep the runs and logs).
# Python: $STEALSIM_PYTHON, else the repo's .venv (scripts/setup.sh, a CPU torch); --device
# cuda needs one with a CUDA torch (docs/server.md#gpu-check).
# Exit 0: every path passed or was skipped; 1: a path failed; 2: no Python or no device.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${STEALSIM_PYTHON:-$root/.venv/bin/python}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "gpu-check: no Python at $python (run scripts/setup.sh, or set STEALSIM_PYTHON)" >&2
  exit 2
fi
check=""
# Whatever ends this script (Ctrl-C, SIGTERM, an error) stops the check, which stops every
# process it started (each in a process group of its own) before it exits.
stop_check() {
  if [ -n "$check" ] && kill -0 "$check" 2>/dev/null; then
    kill -TERM "$check" 2>/dev/null || true
    wait "$check" 2>/dev/null || true
  fi
}
trap stop_check EXIT
trap 'stop_check; exit 130' INT
trap 'stop_check; exit 143' TERM
# The checkout on the path: the check also runs where the project is not installed (a
# Python with a CUDA torch and the other dependencies on PYTHONPATH).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
PYTHONUNBUFFERED=1 "$python" benchmarks/gpu_check.py "$@" &
check=$!
status=0
wait "$check" || status=$?
check=""
exit "$status"
