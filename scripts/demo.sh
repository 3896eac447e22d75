#!/usr/bin/env bash
# The main job: installs what it needs, then runs the end-to-end demo on the embedded default
# (no Redis, no GPU, no network): a normal victim and its Nasty Teacher, the victim service,
# every attack over HTTP, one table, runs/demo/summary.json and runs/demo/report.md.
# Extra arguments go to the command (e.g. scripts/demo.sh --quick). The Nasty Teacher study
# is its own command: .venv/bin/stealsim nasty-study --dataset digits --out runs/study
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/stealsim demo --out runs/demo "$@"
