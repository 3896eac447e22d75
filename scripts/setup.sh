#!/usr/bin/env bash
# Creates .venv and installs torch==2.13.0 (the CPU wheel on these machines) and the
# project with its test tools. Skips the install when pyproject.toml is unchanged.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.stealsim-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torch==2.13.0 and stealsim[test,art] into $venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned: an unpinned torch would pull GBs of CUDA packages.
  # (pip's notes about find-links folders it skips are filtered out; errors still show.)
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0" 2> >(grep -v "is ignored: it is neither" >&2)
  "$venv/bin/python" -m pip install --quiet -e "$root[test,art]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
