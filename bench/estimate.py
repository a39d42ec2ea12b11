"""Benchmark `etl estimate` (local estimator) against `etl submit` of the same queue, and its memory in N.

    .venv/bin/python bench/estimate.py --docs 10000 100000 --db sqlite
    .venv/bin/python bench/estimate.py --docs 10000 100000 --db postgresql

For each N: a fresh database with N queued documents (the documents of bench/run.py), the emulator as
its own process, then as separate processes (wall time and peak RSS from wait4): `etl estimate --json`
(nothing claimed; checked), then `etl submit` of the same queue. The ratio is estimate / submit; the
estimate's peak RSS at the smallest and largest N shows whether its memory grows with the queue.
The last line: `RESULT db=... docs=... estimate_s=... submit_s=... ratio=... estimate_rss_mb=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import DEFAULT_CONFIG, ROOT
from run import PG_ADMIN, Database, Emulator, measure


def one(n: int, kind: str, config: Path, workdir: Path) -> dict[str, float]:
    python = sys.executable
    db = Database(kind, workdir, PG_ADMIN)
    emulator: Emulator | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
        env.update({"ETL_CONFIG": str(config), "ETL_DATABASE_URL": db.url, "ANTHROPIC_API_KEY": "bench-key"})
        etl = [python, "-m", "etl.cli"]
        measure("db_upgrade", [*etl, "db", "upgrade"], env, workdir)
        db.load(n)
        emulator = Emulator(python, workdir)
        env["ANTHROPIC_BASE_URL"] = emulator.base_url
        est = measure("etl_estimate", [*etl, "estimate", "--json"], env, workdir)
        figures = json.loads(est.output)
        queued = db.scalar("SELECT count(*) FROM etl_queue WHERE status = 'queued'")
        if figures["documents"] != n or queued != n:
            raise SystemExit(f"estimate saw {figures['documents']} of {n}; {queued} still queued")
        sub = measure("etl_submit", [*etl, "submit"], env, workdir)
        return {
            "estimate_s": est.seconds,
            "estimate_rss_mb": est.rss_mb,
            "submit_s": sub.seconds,
            "submit_rss_mb": sub.rss_mb,
            "cost_usd": float(figures["cost_usd"]),
            "batches": figures["batches"],
        }
    finally:
        if emulator is not None:
            emulator.stop()
        db.drop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="sqlite")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = p.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "etl")], check=True)
    results = {}
    for n in args.docs:
        workdir = Path(tempfile.mkdtemp(prefix="etl-bench-estimate-"))
        try:
            results[n] = r = one(n, args.db, args.config, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(
            f"RESULT db={args.db} docs={n} estimate_s={r['estimate_s']:.2f} submit_s={r['submit_s']:.2f} "
            f"ratio={r['estimate_s'] / r['submit_s']:.2f} estimate_rss_mb={r['estimate_rss_mb']:.0f} "
            f"submit_rss_mb={r['submit_rss_mb']:.0f} batches={r['batches']} cost_usd={r['cost_usd']:.2f}",
            flush=True,
        )
    small, large = min(results), max(results)
    if small != large:
        print(
            f"RSS estimate {small}: {results[small]['estimate_rss_mb']:.0f} MB, {large}: "
            f"{results[large]['estimate_rss_mb']:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
