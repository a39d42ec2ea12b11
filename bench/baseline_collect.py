"""Collect baseline: the least work that puts the same rows in the same database as `etl collect`.

Per batch: one GET for the batch (ended_at), one query for its rows' doc_key/task/enqueued_at, then the
results stream read over plain `http.client`, each line parsed with `orjson.loads` (as `etl` does) into the same columns
as `etl_results`, loaded into a table with `etl_results`' primary key (doc_key, task) by the fastest bulk
path (COPY on PostgreSQL, one executemany on SQLite), and in the same transaction the batch's queue rows
marked `done` and its batch row `collected`: the same bookkeeping as etl's end state, one transaction per
batch. No upsert (the table starts empty), no events, no report.
Usage: baseline_collect.py DB_URL BASE_URL CONFIG TABLE BATCH_ID...
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import API_VERSION, load_config, price_table

COLUMNS = (
    "doc_key, task, queue_id, custom_id, output_text, output_json, model, stop_reason, input_tokens, "
    "output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_usd, standard_cost_usd, "
    "batch_id, enqueued_at, batch_ended_at, collected_at"
)
HEADERS = {"x-api-key": "bench-key", "anthropic-version": API_VERSION}


def get_json(conn: http.client.HTTPConnection, path: str) -> Any:
    conn.request("GET", path, headers=HEADERS)
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise SystemExit(f"baseline GET {path}: HTTP {response.status}: {payload[:300]!r}")
    return json.loads(payload)


def lines(conn: http.client.HTTPConnection, path: str) -> Iterator[bytes]:
    conn.request("GET", path, headers=HEADERS)
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"baseline GET {path}: HTTP {response.status}")
    rest = b""
    while chunk := response.read1(1 << 16):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def make_cost(cfg: dict[str, Any]) -> Callable[[str, dict[str, Any]], tuple[float, float]]:
    models, rates = price_table(cfg)
    cache: dict[str, tuple[float, float] | None] = {}

    def cost(model: str, usage: dict[str, Any]) -> tuple[float, float]:
        if model not in cache:
            names = [n for n in models if model.startswith(n)]
            cache[model] = models[max(names, key=len)] if names else None
        price = cache[model]
        if price is None:
            return 0.0, 0.0
        detail = usage.get("cache_creation") or {}
        w1h = detail.get("ephemeral_1h_input_tokens") or 0
        w5m = detail.get("ephemeral_5m_input_tokens") or 0
        inp = (
            usage["input_tokens"]
            + w5m * rates["cache_write_5m"]
            + w1h * rates["cache_write_1h"]
            + (usage.get("cache_read_input_tokens") or 0) * rates["cache_read"]
        ) * price[0]
        standard = (inp + usage["output_tokens"] * price[1]) / 1_000_000
        return standard * rates["batch_discount"], standard

    return cost


def batch_rows(
    http_conn: http.client.HTTPConnection,
    batch_id: str,
    expected: dict[int, tuple[str, str, Any]],
    cost: Callable[[str, dict[str, Any]], tuple[float, float]],
    collected_at: str,
    json_tasks: set[str],
) -> Iterator[tuple[Any, ...]]:
    batch = get_json(http_conn, f"/v1/messages/batches/{batch_id}")
    ended_at = batch["ended_at"]
    for line in lines(http_conn, f"/v1/messages/batches/{batch_id}/results"):
        obj = orjson.loads(line)
        result = obj["result"]
        if result["type"] != "succeeded":
            continue
        cid = obj["custom_id"]
        qid = int(cid[1:].split("_", 1)[0])  # q<row>_<intent>_<installation>
        doc_key, task, enqueued_at = expected[qid]
        message = result["message"]
        text = "".join(b["text"] for b in message["content"] if b["type"] == "text")
        usage = message["usage"]
        model = message["model"]
        batch_cost, standard = cost(model, usage)
        yield (
            doc_key,
            task,
            qid,
            cid,
            text,
            text if task in json_tasks else None,
            model,
            message["stop_reason"],
            usage["input_tokens"],
            usage["output_tokens"],
            usage.get("cache_creation_input_tokens") or 0,
            usage.get("cache_read_input_tokens") or 0,
            batch_cost,
            standard,
            batch_id,
            enqueued_at,
            ended_at,
            collected_at,
        )


EXPECTED = (
    "SELECT q.id, q.doc_key, q.task, q.enqueued_at{cast} FROM etl_queue q "
    "JOIN etl_batches b ON q.batch_ref = b.id WHERE b.batch_id = {param}"
)

# Every result of the bench succeeds, so the batch's rows are all `done` (etl settles each by its result).
SETTLE_QUEUE = (
    "UPDATE etl_queue SET status = 'done', updated_at = {p} WHERE status = 'submitted' "
    "AND batch_ref = (SELECT id FROM etl_batches WHERE batch_id = {p})"
)
SETTLE_BATCH = "UPDATE etl_batches SET status = 'collected', collected_at = {p} WHERE batch_id = {p}"


def main() -> int:
    db_url, base_url, config_path, table, *batch_ids = sys.argv[1:]
    cfg = load_config(Path(config_path))
    cost = make_cost(cfg)
    json_tasks = {name for name, task in cfg.get("tasks", {}).items() if task.get("output_schema")}
    url = urlsplit(base_url)
    http_conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    collected_at = datetime.now(UTC).isoformat()
    total = 0
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        for batch_id in batch_ids:
            conn.execute("BEGIN IMMEDIATE")
            query = EXPECTED.format(cast="", param="?")
            expected = {r[0]: r[1:] for r in conn.execute(query, (batch_id,))}
            cur = conn.executemany(
                f"INSERT INTO {table} ({COLUMNS}) VALUES ({', '.join('?' * 18)})",
                batch_rows(http_conn, batch_id, expected, cost, collected_at, json_tasks),
            )
            total += cur.rowcount
            conn.execute(SETTLE_QUEUE.format(p="?"), (collected_at, batch_id))
            conn.execute(SETTLE_BATCH.format(p="?"), (collected_at, batch_id))
            conn.execute("COMMIT")
        conn.close()
    else:
        import psycopg

        with psycopg.connect(db_url) as pg:
            for batch_id in batch_ids:
                query = EXPECTED.format(cast="::text", param="%s")
                expected = {r[0]: r[1:] for r in pg.execute(query, (batch_id,))}
                with pg.cursor() as cur, cur.copy(f"COPY {table} ({COLUMNS}) FROM STDIN") as copy:
                    for row in batch_rows(http_conn, batch_id, expected, cost, collected_at, json_tasks):
                        copy.write_row(row)
                        total += 1
                pg.execute(SETTLE_QUEUE.format(p="%s"), (collected_at, batch_id))
                pg.execute(SETTLE_BATCH.format(p="%s"), (collected_at, batch_id))
                pg.commit()
    print(f"baseline collected {total} result(s) from {len(batch_ids)} batch(es)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
