#!/usr/bin/env bash
# Make sure a PostgreSQL answers on 127.0.0.1:5432 with trust auth for user postgres (the test default).
# Tries, in order: already running; the distribution's cluster (pg_ctlcluster); a private initdb/pg_ctl
# cluster under /tmp. Exits non-zero if none works.
set -uo pipefail
HOST=127.0.0.1 PORT=5432

answers() { pg_isready -h "$HOST" -p "$PORT" -q 2>/dev/null || psql -h "$HOST" -p "$PORT" -U postgres -Atc 'select 1' postgres >/dev/null 2>&1; }

if answers; then echo "postgres: already answering on $HOST:$PORT"; exit 0; fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "postgres: not installed; installing from Debian packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
fi

if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -1)
  if [ -n "$version" ]; then
    echo "postgres: starting cluster $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>&1 || true
    for _ in $(seq 1 30); do answers && exit 0; sleep 1; done
  fi
fi

initdb_bin=$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)
if [ -n "$initdb_bin" ]; then
  bindir=$(dirname "$initdb_bin")
  data=/tmp/etl-ci-pgdata
  runas=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd -r -m postgres
    runas=(runuser -u postgres --)
  fi
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$data"; fi
    "${runas[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust >/dev/null
  fi
  echo "postgres: starting a private cluster in $data"
  "${runas[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/log" -w \
    -o "-p $PORT -c listen_addresses=$HOST -k /tmp" start >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do answers && exit 0; sleep 1; done
fi

echo "postgres: could not get a server to answer on $HOST:$PORT" >&2
exit 1
