"""What `submit`'s supersede step (older queued rows of a (doc_key, task) never sent) costs, against the claim.

    .venv/bin/python bench/supersede.py --docs 100000 --db sqlite
    .venv/bin/python bench/supersede.py --docs 100000 --db postgresql

A fresh database with N queued rows (1 KB bodies, `--dup-percent` of the keys enqueued twice). Measured in
the same run, on restored copies, alternating order: the supersede statement (`etl.store.queue.supersede`)
and the baseline, the claim of one batch of up to 100,000 rows that every submit makes anyway
(`etl.store.queue.claim`). The last line: `RESULT db=... docs=... supersede_s=... claim_s=... ratio=...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etl.clock import utcnow
from etl.store import migrate
from etl.store import queue as q
from etl.store.batches import create_intent
from etl.store.engine import make_engine

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def fresh(kind: str, workdir: Path, tag: str) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / f'{tag}.db'}", None
    name = f"etl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def load(url: str, n: int, dup_percent: int) -> None:
    engine = make_engine(url)
    migrate.upgrade(engine, engine)
    body = "x" * 1000
    dups = n * dup_percent // 100
    rows = [{"doc_key": f"doc-{i}", "body": body} for i in range(n - dups)]
    rows += [{"doc_key": f"doc-{i}", "body": body} for i in range(dups)]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO etl_queue (doc_key, body) VALUES (:doc_key, :body)"), rows)
        conn.execute(text("ANALYZE"))
    engine.dispose()


def timed(url: str, what: str) -> float:
    engine = make_engine(url)
    now = utcnow()
    with engine.begin() as conn:
        started = time.perf_counter()
        if what == "supersede":
            q.supersede(conn, now)
        else:
            q.claim(conn, create_intent(conn, "bench", now, now), 100_000, now)
        took = time.perf_counter() - started
    engine.dispose()
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--dup-percent", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    times: dict[str, list[float]] = {"supersede": [], "claim": []}
    created: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            order = ["supersede", "claim"] if i % 2 == 0 else ["claim", "supersede"]
            for what in order:
                url, name = fresh(args.db, Path(tmp), f"{what}{i}")
                if name:
                    created.append(name)
                load(url, args.docs, args.dup_percent)
                times[what].append(timed(url, what))
    if created:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    s, c = statistics.median(times["supersede"]), statistics.median(times["claim"])
    print(
        f"RESULT db={args.db} docs={args.docs} dup_percent={args.dup_percent} supersede_s={s:.3f} "
        f"claim_s={c:.3f} ratio={s / c:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
