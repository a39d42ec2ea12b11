#!/usr/bin/env bash
# Install everything and run every check: the one test command (README; .ci/run calls exactly this).
#   - a virtual environment in .venv with the project and its test extras
#   - a PostgreSQL on 127.0.0.1:5432 (started if none answers; required when CI is set)
#   - ruff (lint + format check), mypy --strict on etl/, deployment checks, then pytest
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

if ! scripts/ensure-postgres.sh; then
  if [ -n "${CI:-}" ]; then echo "CI is set and PostgreSQL is required" >&2; exit 1; fi
  echo "warning: no PostgreSQL; its tests will be skipped" >&2
fi
scripts/ensure-prometheus.sh || { [ -z "${CI:-}" ] || exit 1; echo "warning: no Prometheus; its tests will be skipped" >&2; }

echo "== ruff"
.venv/bin/ruff check etl tests bench
.venv/bin/ruff format --check etl tests bench
echo "== mypy"
.venv/bin/mypy etl
if [ -x deploy/check.sh ]; then
  echo "== deployment checks"
  PATH="$PWD/.venv/bin:$PATH" deploy/check.sh
fi
if [ -x deploy/docker-smoke.sh ]; then
  echo "== the Dockerfile's install steps in a clean virtual environment"
  deploy/docker-smoke.sh
fi
echo "== pytest"
.venv/bin/pytest "$@"
