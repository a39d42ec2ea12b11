#!/usr/bin/env bash
# Prove the Dockerfile's commands without a Docker engine: build context as .dockerignore leaves it,
# the lock (requirements/run.txt, hashes required) then the project without dependencies into a clean
# virtual environment (as the image's RUN step does), then the commands the image runs: `etl --help`,
# `etl db upgrade`, and the HEALTHCHECK's `etl status --check`.
# Usage: deploy/docker-smoke.sh [python]   (default: python3.11, else python3)
# ETL_LOCK_DIR: the folder of the lock to install from (default: requirements).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$(command -v python3.11 || command -v python3)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== build context (what the Dockerfile COPYs)"
mkdir -p "$work/src" "$work/etc/etl" "$work/var/lib/etl"
cp "$root/pyproject.toml" "$work/src/"
mkdir -p "$work/src/requirements"
cp "$root/${ETL_LOCK_DIR:-requirements}/run.txt" "$work/src/requirements/run.txt"
if [ -f "$root/README.md" ]; then cp "$root/README.md" "$work/src/"; else
    echo "docker-smoke: README.md is missing; the Dockerfile COPYs it and pyproject.toml names it" >&2
    exit 1
fi
(cd "$root" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - etl) | tar -xf - -C "$work/src"
cp "$root/config/etl.toml" "$work/etc/etl/etl.toml"

echo "== pip install from the lock, then the project (clean venv, $("$python" --version))"
"$python" -m venv "$work/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$work/venv/bin/pip" install --quiet --require-hashes --no-deps -r "$work/src/requirements/run.txt"
"$work/venv/bin/pip" install --quiet --no-deps --no-build-isolation "$work/src"
"$work/venv/bin/pip" check

export ETL_CONFIG="$work/etc/etl/etl.toml"
export ETL_DATABASE_URL="sqlite:///$work/var/lib/etl/etl.db"
unset ETL_WAREHOUSE_URL ANTHROPIC_BASE_URL ANTHROPIC_API_KEY CREDENTIALS_DIRECTORY NOTIFY_SOCKET || true
cd "$work/var/lib/etl"
etl="$work/venv/bin/etl"

echo "== etl --help"
"$etl" --help >/dev/null
echo "== etl db upgrade"
"$etl" db upgrade
echo "== etl status --check (the HEALTHCHECK)"
"$etl" status --check
echo "== etl metrics (the page etl run serves on ETL_METRICS_LISTEN, EXPOSE 9464)"
"$etl" metrics | grep -q '^etl_health_ok 1' || { echo "docker-smoke: etl metrics shows no healthy page" >&2; exit 1; }
echo "== etl run refuses to start without an API key, with EX_CONFIG (78)"
set +e
"$etl" run 2>"$work/run.err"
rc=$?
set -e
if [ "$rc" -ne 78 ]; then
    cat "$work/run.err"
    echo "docker-smoke: etl run without a key exited $rc, expected 78" >&2
    exit 1
fi
echo "docker-smoke: OK"
