"""Submit baseline: the least work that produces the same batches as `etl submit`.

One query streams the queued rows, each is encoded to the same request JSON, and one POST per batch
(same caps as the config) goes to the emulator over a plain `http.client` connection. The same
bookkeeping as etl's end state: per batch, one transaction writes the batch row (`etl_batches`, its
`batch_id`, count and bytes) and marks its queue rows `submitted` with `batch_ref`. No claims, no
intents, no validation, no SDK. Usage: baseline_submit.py DB_URL BASE_URL CONFIG
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
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


class Book:
    """The bookkeeping of one sent batch: its row in etl_batches and its queue rows `submitted`."""

    def __init__(self, db_url: str) -> None:
        self.sqlite = db_url.startswith("sqlite:///")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        else:
            import psycopg

            self.conn = psycopg.connect(db_url)

    def close(self) -> None:
        self.conn.close()

    def record(self, batch_id: str, ids: list[int], size: int) -> None:
        now = datetime.now(UTC)
        if self.sqlite:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            ref = c.execute(
                "INSERT INTO etl_batches (batch_id, status, request_count, payload_bytes, created_at, "
                "submitted_at) VALUES (?, 'submitted', ?, ?, ?, ?) RETURNING id",
                (batch_id, len(ids), size, now.isoformat(), now.isoformat()),
            ).fetchone()[0]
            c.execute(
                "UPDATE etl_queue SET status = 'submitted', batch_ref = ?, updated_at = ? "
                "WHERE id IN (SELECT value FROM json_each(?))",
                (ref, now.isoformat(), json.dumps(ids)),
            )
            c.execute("COMMIT")
            return
        with self.conn.transaction():
            ref = self.conn.execute(
                "INSERT INTO etl_batches (batch_id, status, request_count, payload_bytes, created_at, "
                "submitted_at) VALUES (%s, 'submitted', %s, %s, %s, %s) RETURNING id",
                (batch_id, len(ids), size, now, now),
            ).fetchone()[0]
            self.conn.execute(
                "UPDATE etl_queue SET status = 'submitted', batch_ref = %s, updated_at = %s WHERE id = ANY(%s)",
                (ref, now, ids),
            )


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
    book = Book(db_url)
    parts: list[bytes] = []
    ids: list[int] = []
    size = 16
    sent = batches = 0

    def flush() -> None:
        nonlocal sent, batches
        book.record(post(conn, parts), ids, size - 1)
        sent += len(parts)
        batches += 1

    for qid, doc_key, task, body, metadata in rows(db_url):
        encoded = encode(qid, doc_key, task, body, metadata, tasks)
        if len(parts) >= max_requests or size + len(encoded) + 1 > max_bytes:
            flush()
            parts, ids, size = [], [], 16
        parts.append(encoded)
        ids.append(qid)
        size += len(encoded) + 1
    if parts:
        flush()
    book.close()
    conn.close()
    print(f"baseline submitted {sent} request(s) in {batches} batch(es)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
