#!/usr/bin/env bash
# A venv of its own for Seldon MLServer (a third-party Open Inference Protocol v2 server)
# with its scikit-learn runtime, which the tests attack; its pins stay out of .venv.
# Sourced by scripts/test.sh: exports STEALSIM_MLSERVER (the mlserver executable).
# Skips the install when it is there already.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_root/.venv-mlserver"
_want="mlserver==1.7.1 mlserver-sklearn==1.7.1"
if [ ! -f "$_venv/.installed" ] || [ "$(cat "$_venv/.installed")" != "$_want" ]; then
  echo "test: installing $_want into $_venv"
  "${PYTHON:-python3}" -m venv "$_venv"
  # shellcheck disable=SC2086
  "$_venv/bin/python" -m pip install --quiet $_want 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$_want" > "$_venv/.installed"
fi
export STEALSIM_MLSERVER="$_venv/bin/mlserver"
