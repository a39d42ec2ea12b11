"""Benchmark the metrics page: what a scrape costs at N queued rows, and whether scrapes slow the submit.

    .venv/bin/python bench/metrics.py --docs 100000 1000000 --db sqlite
    .venv/bin/python bench/metrics.py --docs 100000 1000000 --db postgresql
    .venv/bin/python bench/metrics.py --docs 100000 --db sqlite --submit 3   # + the submit comparison

Scrape cost: a fresh database with N queued documents (those of bench/run.py), then `etl.metrics.page`
in this process `--scrapes` times (the first warms the caches): the median wall time of a whole page,
and of `etl status`'s part of it (the health verdict) on its own.

With `--submit R`: the nightly submit of the same N rows by a real `etl run` (ETL_DAEMON_RUN_NOW=submit)
against the emulator, R times without scrapes and R times with a scrape of its HTTP page every
`--every` seconds (default 1 s: 60 times Prometheus' usual rate), alternating, each on a restored copy of
the database. The submit's own time is read from etl_runs (ended_at - started_at). Last line:
`RESULT db=... docs=... scrape_s=... status_s=... submit_s=... submit_scraped_s=... slowdown=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import DEFAULT_CONFIG, ROOT
from run import PG_ADMIN, Database, Emulator, measure

sys.path.insert(0, str(ROOT))


def scrape_cost(url: str, config: Path, scrapes: int) -> tuple[float, float]:
    from etl import metrics, status
    from etl.config import load
    from etl.parts import Parts

    rt = Parts.open(load({"ETL_DATABASE_URL": url, "ANTHROPIC_API_KEY": "bench-key"}, config))
    try:
        pages, verdicts = [], []
        for _ in range(scrapes):
            start = time.perf_counter()
            page = metrics.page(rt.config, rt.db, rt.me.owner, rt.clock)
            pages.append(time.perf_counter() - start)
            start = time.perf_counter()
            status.status(rt.config, rt.db, rt.me.owner, rt.clock())
            verdicts.append(time.perf_counter() - start)
        if "etl_database_up 1.0" not in page:
            raise SystemExit("the page did not read the database:\n" + page[-2000:])
        return statistics.median(pages[1:] or pages), statistics.median(verdicts[1:] or verdicts)
    finally:
        rt.close()


def daemon_submit(db: Database, env: dict[str, str], workdir: Path, every: float | None) -> float:
    """One nightly submit by `etl run`, scraped every `every` seconds (None: never); its seconds."""
    log = workdir / "daemon.log"
    run_env = {**env, "ETL_DAEMON_RUN_NOW": "submit", "ETL_METRICS_LISTEN": "127.0.0.1:0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl.cli", "--log-json", "run"],
            env=run_env,
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    stop = threading.Event()
    scrapes = [0]

    def scraper(url: str) -> None:
        while not stop.wait(every):
            with urllib.request.urlopen(url, timeout=120) as resp:
                resp.read()
            scrapes[0] += 1

    try:
        url = _wait(lambda: _served(log), proc, "metrics_serving")
        thread = threading.Thread(target=scraper, args=(url,), daemon=True)
        if every is not None:
            thread.start()
        query = "SELECT count(*) FROM etl_runs WHERE job = 'submit' AND outcome <> 'running'"
        _wait(lambda: db.scalar(query), proc, "the submit to end")
        stop.set()
        if every is not None:
            thread.join(120)
        seconds = float(db.scalar(_RUN_SECONDS[db.kind]))
    finally:
        proc.terminate()
        proc.wait(120)
    print(f"  submit {'scraped' if every else 'alone  '} {seconds:7.2f} s ({scrapes[0]} scrapes)", flush=True)
    return seconds


_RUN_SECONDS = {
    "sqlite": "SELECT (julianday(ended_at) - julianday(started_at)) * 86400 FROM etl_runs WHERE job = 'submit'",
    "postgresql": "SELECT extract(epoch FROM ended_at - started_at) FROM etl_runs WHERE job = 'submit'",
}


def _served(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"metrics_serving"' in line:
            return str(json.loads(line)["url"])
    return None


def _wait(probe: object, proc: subprocess.Popen[bytes], what: str, timeout: float = 3600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()  # type: ignore[operator]
        if value:
            return str(value)
        if proc.poll() is not None:
            raise SystemExit(f"etl run exited {proc.returncode} before {what}")
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def one(n: int, kind: str, args: argparse.Namespace, workdir: Path) -> str:
    db = Database(kind, workdir, PG_ADMIN)
    emulator: Emulator | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
        env.update(
            {"ETL_CONFIG": str(args.config), "ETL_DATABASE_URL": db.url, "ANTHROPIC_API_KEY": "bench-key"}
        )
        measure("db_upgrade", [sys.executable, "-m", "etl.cli", "db", "upgrade"], env, workdir)
        db.load(n)
        scrape_s, status_s = scrape_cost(db.url, args.config, args.scrapes)
        line = f"RESULT db={kind} docs={n} scrape_s={scrape_s:.3f} status_s={status_s:.3f}"
        print(
            f"{kind} {n:,} queued: a scrape {scrape_s:.3f} s, of which etl status {status_s:.3f} s",
            flush=True,
        )
        if not args.submit:
            return line
        emulator = Emulator(sys.executable, workdir)
        env["ANTHROPIC_BASE_URL"] = emulator.base_url
        db.snapshot("queued")
        alone, scraped = [], []
        for i in range(args.submit):
            for every in (None, args.every) if i % 2 == 0 else (args.every, None):
                db.restore("queued")
                emulator.reset()
                (scraped if every else alone).append(daemon_submit(db, env, workdir, every))
        a, s = statistics.median(alone), statistics.median(scraped)
        return line + f" submit_s={a:.2f} submit_scraped_s={s:.2f} slowdown={s / a - 1:+.3f}"
    finally:
        if emulator is not None:
            emulator.stop()
        db.drop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[100_000])
    p.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--scrapes", type=int, default=6, help="scrapes per size (the first warms up)")
    p.add_argument(
        "--submit", type=int, default=0, metavar="R", help="also compare R submits with and without"
    )
    p.add_argument("--every", type=float, default=1.0, help="seconds between scrapes during the submit")
    args = p.parse_args(argv)
    lines = []
    for n in args.docs:
        workdir = Path(tempfile.mkdtemp(prefix="etl-bench-metrics-"))
        try:
            lines.append(one(n, args.db, args, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
