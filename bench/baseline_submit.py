"""Submit baseline: the least work that produces the same batches as `etl submit`.

One query streams the queued rows, each is encoded to the same request JSON, and one POST per batch
(same caps as the config) goes to the emulator over a plain `http.client` connection. No claims, no
intents, no validation, no SDK. Usage: baseline_submit.py DB_URL BASE_URL CONFIG
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import API_VERSION, encode, load_config, task_params

QUERY = (
    "SELECT id, doc_key, task, body, metadata{cast} FROM etl_queue "
    "WHERE status = 'queued' ORDER BY priority DESC, id"
)


def rows(db_url: str) -> Iterator[tuple[Any, ...]]:
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        yield from conn.execute(QUERY.format(cast=""))
        conn.close()
        return
    import psycopg

    with psycopg.connect(db_url) as conn, conn.cursor(name="baseline") as cur:
        cur.itersize = 5000
        cur.execute(QUERY.format(cast="::text"))
        yield from cur


def post(conn: http.client.HTTPConnection, parts: list[bytes]) -> str:
    body = b'{"requests":[' + b",".join(parts) + b"]}"
    conn.request(
        "POST",
        "/v1/messages/batches",
        body=body,
        headers={
            "content-type": "application/json",
            "x-api-key": "bench-key",
            "anthropic-version": API_VERSION,
        },
    )
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise SystemExit(f"baseline create failed: HTTP {response.status}: {payload[:300]!r}")
    return str(json.loads(payload)["id"])


def main() -> int:
    db_url, base_url, config_path = sys.argv[1:4]
    cfg = load_config(Path(config_path))
    tasks = task_params(cfg)
    max_requests = int(cfg.get("submit", {}).get("max_requests_per_batch", 100_000))
    max_bytes = int(cfg.get("submit", {}).get("max_batch_bytes", 200_000_000))
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    parts: list[bytes] = []
    size = 16
    sent = batches = 0
    for qid, doc_key, task, body, metadata in rows(db_url):
        encoded = encode(qid, doc_key, task, body, metadata, tasks)
        if len(parts) >= max_requests or size + len(encoded) + 1 > max_bytes:
            post(conn, parts)
            sent += len(parts)
            batches += 1
            parts, size = [], 16
        parts.append(encoded)
        size += len(encoded) + 1
    if parts:
        post(conn, parts)
        sent += len(parts)
        batches += 1
    print(f"baseline submitted {sent} request(s) in {batches} batch(es)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
