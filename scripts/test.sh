#!/usr/bin/env bash
# The test command: installs what it needs, makes sure a Redis server answers, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k server -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# shellcheck source=scripts/redis.sh
source scripts/redis.sh
echo "test: Redis at $STEALSIM_TEST_REDIS_URL"
# shellcheck source=scripts/third-party-servers.sh
source scripts/third-party-servers.sh  # MLServer's and KServe's own venvs
# static checks first: ruff (pyproject's rules) and strict mypy over the packages
.venv/bin/ruff check --quiet .
.venv/bin/mypy --no-error-summary
# pytest exits 5 when it collected no tests: that is a failure too (set -e).
.venv/bin/python -m pytest "$@"
