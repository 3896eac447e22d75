#!/usr/bin/env bash
# A venv of its own for KServe's Python model server (kserve.Model subclasses served by
# kserve.ModelServer, a third-party Open Inference Protocol v2 server), which the tests
# attack; its many pins stay out of .venv.
# Sourced by scripts/test.sh: exports STEALSIM_KSERVE_PYTHON (the venv's python).
# Skips the install when it is there already.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv-kserve"
_want="kserve==0.21.0"
if [ ! -f "$_venv/.installed" ] || [ "$(cat "$_venv/.installed")" != "$_want" ]; then
  echo "test: installing $_want into $_venv"
  "${PYTHON:-python3}" -m venv "$_venv"
  # shellcheck disable=SC2086
  "$_venv/bin/python" -m pip install --quiet $_want 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$_want" > "$_venv/.installed"
fi
export STEALSIM_KSERVE_PYTHON="$_venv/bin/python"
