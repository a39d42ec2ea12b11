#!/usr/bin/env bash
# Install everything and run every check: the one test command (README; .ci/run calls exactly this).
#   - a virtual environment in .venv with exactly the versions of requirements/test.txt (the lock, with
#     hashes), then the project itself without dependencies; a second one, .venv-oldest, with the
#     oldest anthropic SDK the range allows (requirements/oldest.txt) for the provider seam's tests
#   - a PostgreSQL on 127.0.0.1:5432 (started if none answers; required when CI is set)
#   - ruff (lint + format check), mypy --strict on etl/, deployment checks, then pytest
# Overrides (used by scripts/lock.sh to try a candidate lock without touching this checkout's .venv):
#   ETL_LOCK_DIR  folder holding test.txt and run.txt (default: requirements)
#   ETL_VENV      the virtual environment to make and use (default: .venv; and $ETL_VENV-oldest)
#   ETL_TEST_WORKERS  pytest-xdist workers (default 2; 0 runs the tests in one process)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
lock_dir=${ETL_LOCK_DIR:-requirements}
venv=$(realpath -m "${ETL_VENV:-.venv}")

# A venv is made from its lock alone: when the lock (or the Python) changed since it was made, it is made
# again, so no package left over from an older lock or a hand install can pass for a tested one. The
# project itself goes in editable and without dependencies (they all come from the lock, setuptools too).
make_venv() {  # make_venv DIR LOCK
  local dir=$1 lock=$2 stamp
  stamp=$( (cat "$lock"; "$python" --version) | sha256sum | cut -d' ' -f1)
  if [ ! -x "$dir/bin/python" ] || [ "$(cat "$dir/.etl-lock" 2>/dev/null)" != "$stamp" ]; then
    echo "== installing from $lock into $dir"
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$lock"
    echo "$stamp" > "$dir/.etl-lock"
  fi
  "$dir/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
  "$dir/bin/python" -m pip check
}
make_venv "$venv" "$lock_dir/test.txt"

if ! scripts/ensure-postgres.sh; then
  if [ -n "${CI:-}" ]; then echo "CI is set and PostgreSQL is required" >&2; exit 1; fi
  echo "warning: no PostgreSQL; its tests will be skipped" >&2
fi
scripts/ensure-prometheus.sh || { [ -z "${CI:-}" ] || exit 1; echo "warning: no Prometheus; its tests will be skipped" >&2; }

echo "== versions under test: $("$venv/bin/python" -m pip freeze | grep -iE '^(anthropic|httpx2|sqlalchemy|psycopg|apscheduler)==' | tr '\n' ' ')"
echo "== ruff"
"$venv/bin/ruff" check etl tests bench
"$venv/bin/ruff" format --check etl tests bench
echo "== mypy"
"$venv/bin/mypy" etl
if [ -x deploy/check.sh ]; then
  echo "== deployment checks"
  PATH="$venv/bin:$PATH" deploy/check.sh
fi
if [ -x deploy/docker-smoke.sh ]; then
  echo "== the Dockerfile's install steps in a clean virtual environment"
  ETL_LOCK_DIR="$lock_dir" deploy/docker-smoke.sh
fi
echo "== the provider seam and the emulator against the oldest SDK the range allows ($lock_dir/oldest.txt)"
make_venv "$venv-oldest" "$lock_dir/oldest.txt"
# Two workers (pytest-xdist), a test file per worker at a time: most tests wait on a subprocess, a socket or
# a database, so two of them share the machine's two cores well (926 tests: 15 min on this machine, about 35 in one process).
# ETL_TEST_WORKERS=0 runs them in this one process (e.g. to debug); arguments after this command follow.
workers=${ETL_TEST_WORKERS:-2}
"$venv-oldest/bin/pytest" -q -p no:cacheprovider -n "$workers" --dist loadfile tests/emulator
echo "== pytest ($workers workers)"
"$venv/bin/pytest" -n "$workers" --dist loadfile --durations=30 "$@"
