#!/usr/bin/env bash
# The main job: installs what it needs, then runs the end-to-end demo on the embedded
# default (no Redis, no GPU, no network). Extra arguments go to the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/stealsim nasty-study --dataset digits --out runs/demo "$@"
