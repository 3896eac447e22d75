#!/usr/bin/env bash
# Venvs of their own for the third-party Open Inference Protocol v2 servers the tests
# attack, so that their pins stay out of .venv:
#   .venv-mlserver  Seldon MLServer with its scikit-learn runtime (exports STEALSIM_MLSERVER,
#                   the mlserver executable)
#   .venv-kserve    KServe's Python model server: kserve.Model subclasses served by
#                   kserve.ModelServer (exports STEALSIM_KSERVE_PYTHON, the venv's python)
# Sourced by scripts/test.sh. Each install is skipped when its venv holds the wanted pins.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# _own_venv DIR "PACKAGES": create DIR with PACKAGES installed, unless it has them already.
_own_venv() {
  local venv="$1" want="$2"
  if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$want" ]; then
    echo "test: installing $want into $venv"
    "${PYTHON:-python3}" -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install --quiet $want 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" > "$venv/.installed"
  fi
}

_own_venv "$_root/.venv-mlserver" "mlserver==1.7.1 mlserver-sklearn==1.7.1"
export STEALSIM_MLSERVER="$_root/.venv-mlserver/bin/mlserver"
_own_venv "$_root/.venv-kserve" "kserve==0.21.0"
export STEALSIM_KSERVE_PYTHON="$_root/.venv-kserve/bin/python"
