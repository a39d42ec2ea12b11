#!/usr/bin/env bash
# Make sure Prometheus and promtool are installed (Debian's `prometheus` package ships both): the alert
# rule tests and the end-to-end scrape test need them (docs/deploy.md "Monitoring"). As root and missing,
# installs the package without its recommends (node-exporter and friends), and stops the service the
# package may have started on :9090: the tests start their own server on a free loopback port.
# Exits non-zero when they are missing and cannot be installed (scripts/test.sh fails on it under CI).
set -uo pipefail

have() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

if have; then echo "prometheus: $(prometheus --version 2>&1 | head -1)"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus: not installed and cannot install it here (needs root and apt-get)" >&2
  exit 1
fi
echo "prometheus: not installed; installing Debian's package"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package enables a service listening on :9090; where a service manager started it, stop it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus && systemctl disable --quiet prometheus || true
elif command -v invoke-rc.d >/dev/null 2>&1; then
  invoke-rc.d prometheus stop >/dev/null 2>&1 || true
fi
have || { echo "prometheus: the package installed no prometheus/promtool" >&2; exit 1; }
echo "prometheus: $(prometheus --version 2>&1 | head -1)"
