#!/usr/bin/env bash
# The lock: requirements/test.txt (everything scripts/test.sh installs), requirements/run.txt (what the
# demo and the Docker image install; the same versions), requirements/oldest.txt (test.txt with the
# oldest anthropic SDK that pyproject.toml's range allows, for the provider seam's tests). All three are
# made by pip-tools from pyproject.toml's ranges, with hashes.
#
#   scripts/lock.sh            move the lock: resolve the newest versions the ranges allow, run the WHOLE
#                              suite (scripts/test.sh) on them, and only if it passes write requirements/
#   scripts/lock.sh --check    the same without writing anything: drift is seen the day it happens
#   scripts/lock.sh --package anthropic   move one package only (pip-compile -P), same suite, same rule
#
# Extra arguments after `--` go to pytest. Needs the package registry; the suite needs PostgreSQL as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=write
upgrade=(--upgrade)
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check; shift ;;
    --package) upgrade=(--upgrade-package "$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "usage: scripts/lock.sh [--check] [--package NAME] [-- pytest args]" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
PIP_TOOLS_VERSION=7.7.0
tools=.venv-lock-tools
if [ ! -x "$tools/bin/pip-compile" ] || ! "$tools/bin/pip-compile" --version | grep -q "$PIP_TOOLS_VERSION"; then
  rm -rf "$tools"
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "pip-tools==$PIP_TOOLS_VERSION"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Compiled inside a copy so that the files' headers name the same relative paths as the committed ones.
mkdir -p "$work/src/requirements"
cp pyproject.toml README.md "$work/src/"
cp requirements/*.txt "$work/src/requirements/"
floor=$(grep -oE '"anthropic>=[0-9.]+' pyproject.toml | cut -d= -f2)
compile=("$PWD/$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras
  --no-emit-index-url --no-emit-find-links)
(
  cd "$work/src"
  "${compile[@]}" "${upgrade[@]}" --extra test --build-deps-for editable --build-deps-for wheel \
    -o requirements/test.txt pyproject.toml
  "${compile[@]}" --build-deps-for wheel -c requirements/test.txt -o requirements/run.txt pyproject.toml
  cp requirements/test.txt requirements/oldest.txt
  "${compile[@]}" --extra test --build-deps-for editable --build-deps-for wheel \
    --upgrade-package "anthropic==$floor" -o requirements/oldest.txt pyproject.toml
) 2>&1 | grep -v "^WARNING: Location" || true

pins() { grep -hE '^[A-Za-z0-9_.-]+==' "$1" | sed 's/ .*//' | sort; }
echo "== what would move (committed -> newest the ranges allow)"
if diff <(pins requirements/test.txt) <(pins "$work/src/requirements/test.txt") >"$work/diff"; then
  echo "nothing: the lock is already the newest"
else
  grep -E '^[<>]' "$work/diff" || true
fi

echo "== the whole suite on the candidate lock"
ETL_LOCK_DIR="$work/src/requirements" ETL_VENV="$work/venv" scripts/test.sh "$@"

if [ "$mode" = check ]; then
  echo "lock.sh --check: the suite passes on the newest versions; requirements/ left as it is"
else
  cp "$work/src/requirements/"{test,run,oldest}.txt requirements/
  echo "lock.sh: the suite passed; requirements/ now holds the new lock. Review and commit it."
fi
