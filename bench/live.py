"""The live path: throughput against a bare client, and pick-up latency from INSERT to the request leaving.

    .venv/bin/python bench/live.py --db postgresql
    .venv/bin/python bench/live.py --db sqlite

The emulator runs as its own process, answering `POST /v1/messages` after `--latency` seconds (300 ms).

Throughput: `--docs` urgent rows (`mode = 'live'`) processed by the live worker (`LiveWorker.run(once=True)`,
claims, recorded calls, results and settlement included) at `--concurrency` 16, against a baseline in the
same run: the same requests (built by `etl.prompt.build_params`) POSTed by `--concurrency` threads over one
bare `httpx2.Client`, nothing else. Ratio = worker seconds / baseline seconds (target <= 1.2).

Pick-up latency: the worker runs in a thread as `etl run` runs it (PostgreSQL: LISTEN/NOTIFY; SQLite: the
`live.poll_seconds` poll, default 2 s); `--samples` urgent rows are INSERTed one at a time with plain SQL
at random moments (uniform over one poll interval after the previous pick-up), and the latency is from the INSERT's commit to the moment the worker's Messages call
leaves (timed inside `Provider.create_message`). p50 and p99 reported (targets: p50 <= 0.5 s on
PostgreSQL, p99 <= 3 s on SQLite).

The last line: `LIVE db=... docs=... concurrency=... worker_s=... baseline_s=... ratio=... pickup_p50_s=...
pickup_p99_s=... samples=...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import ROOT
from run import PG_ADMIN, Database, Emulator

sys.path.insert(0, str(ROOT))

import httpx2
from sqlalchemy import text

from etl import config as config_mod
from etl import live
from etl.api import Api
from etl.parts import Parts
from etl.prompt import Row, build_params
from etl.provider import LiveReply, Provider
from etl.settings import Settings
from etl.store import migrate

KEY = "bench-live-key"


def set_latency(base_url: str, seconds: float) -> None:
    request = urllib.request.Request(
        f"{base_url}/_emulator/live",
        data=f'{{"latency_seconds": {seconds}}}'.encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


class TimedProvider(Provider):
    """Notes when each Messages call leaves, by the document's text (the bench's only instrument)."""

    left: dict[str, float] = {}

    def create_message(self, params: Any) -> LiveReply:
        TimedProvider.left[params["messages"][0]["content"]] = time.time()
        return super().create_message(params)


def runtime(db_url: str, base_url: str, concurrency: int, poll: float) -> Parts:
    path = Path(tempfile.mkdtemp(prefix="etl-live-cfg-")) / "etl.toml"
    body = (ROOT / "config" / "etl.toml").read_text()
    body = body.replace("concurrency = 4", f"concurrency = {concurrency}")
    body = body.replace("requests_per_minute = 50", "requests_per_minute = 100000")
    body = body.replace("poll_seconds = 2.0", f"poll_seconds = {poll}")
    path.write_text(body)
    env = {"ETL_DATABASE_URL": db_url, "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": KEY}
    cfg = config_mod.load(env, path)
    rt = Parts.open(cfg)

    def factory() -> Provider:
        return TimedProvider(api_key=KEY, base_url=base_url, timeout=60)

    return dataclasses.replace(rt, api=Api(factory))


def insert(rt: Parts, docs: list[tuple[str, str]]) -> None:
    with rt.db.main.begin() as conn:
        conn.execute(
            text("INSERT INTO etl_queue (doc_key, body, mode) VALUES (:k, :b, 'live')"),
            [{"k": k, "b": b} for k, b in docs],
        )


def throughput(rt: Parts, base_url: str, n: int, concurrency: int) -> tuple[float, float]:
    docs = [(f"t{i}", f"Throughput document {i}: crates, invoices and the weather.") for i in range(n)]
    params = [
        build_params(Row(i, k, "default", b, None), rt.config.tasks, rt.config.submit.max_body_bytes)
        for i, (k, b) in enumerate(docs)
    ]
    client = httpx2.Client(
        base_url=base_url,
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        timeout=60,
        limits=httpx2.Limits(max_connections=concurrency * 2),
    )
    client.post("/v1/messages", json=params[0]).raise_for_status()  # connections warm, as the worker's are
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for response in pool.map(lambda p: client.post("/v1/messages", json=p), params):
            response.raise_for_status()
    baseline = time.perf_counter() - started
    client.close()

    _ = rt.api.provider  # the SDK imported before the clock starts, as in a running daemon
    insert(rt, docs)
    started = time.perf_counter()
    out = live.run(rt.config, rt.db, rt.api, rt.clock, once=True)
    worker = time.perf_counter() - started
    if out.succeeded != n:
        raise SystemExit(f"the worker answered {out.succeeded} of {n}")
    return worker, baseline


def pickup(rt: Parts, samples: int, seed: int, poll: float) -> list[float]:
    rng = random.Random(seed)
    stop = threading.Event()
    worker = live.LiveWorker(Settings(rt.config), rt.db, rt.api, rt.clock, stop)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    time.sleep(1.0)  # the LISTEN connection is open and the first poll done
    delays = []
    for i in range(samples):
        body = f"Pick-up sample {i}, needed now."
        time.sleep(rng.uniform(0.05, poll + 0.05))  # any phase of the SQLite poll, equally often
        committed = time.time()
        insert(rt, [(f"p{i}", body)])
        key = build_params(Row(0, f"p{i}", "default", body, None), rt.config.tasks, 10**6)["messages"][0][
            "content"
        ]
        deadline = time.time() + 30
        while key not in TimedProvider.left and time.time() < deadline:
            time.sleep(0.005)
        if key not in TimedProvider.left:
            raise SystemExit(f"sample {i} was not picked up within 30 s")
        delays.append(TimedProvider.left[key] - committed)
    stop.set()
    thread.join(30)
    return delays


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--docs", type=int, default=320)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency", type=float, default=0.3)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--poll", type=float, default=2.0, help="live.poll_seconds (SQLite)")
    p.add_argument("--pg-admin", default=PG_ADMIN)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="etl-live-bench-"))
    db = Database(args.db, workdir, args.pg_admin)
    emulator = Emulator(sys.executable, workdir)
    try:
        set_latency(emulator.base_url, args.latency)
        rt = runtime(db.url, emulator.base_url, args.concurrency, args.poll)
        migrate.upgrade(rt.db.main, rt.db.warehouse)
        worker_s, baseline_s = throughput(rt, emulator.base_url, args.docs, args.concurrency)
        set_latency(emulator.base_url, 0.0)
        delays = pickup(rt, args.samples, seed=1, poll=args.poll)
        rt.close()
        p50, p99 = statistics.median(delays), percentile(delays, 0.99)
        print(
            f"LIVE db={args.db} docs={args.docs} concurrency={args.concurrency} latency_s={args.latency} "
            f"worker_s={worker_s:.2f} baseline_s={baseline_s:.2f} ratio={worker_s / baseline_s:.2f} "
            f"pickup_p50_s={p50:.3f} pickup_p99_s={p99:.3f} samples={len(delays)}"
        )
    finally:
        emulator.stop()
        db.drop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
