"""Benchmark `etl submit` and `etl collect` against their least-work baselines, in one run.

    .venv/bin/python bench/run.py --docs 100000 --db postgresql
    .venv/bin/python bench/run.py --docs 100000 --db sqlite

What it does: a fresh database (a throwaway PostgreSQL database, or a SQLite file in a temporary folder),
`etl db upgrade`, N queued documents (1 KB bodies; 80 % task `default`, 20 % task `classify` with
metadata {"title": ...}) loaded by COPY/executemany and ANALYZEd, the emulator started as its own process
with zero processing time. Then, each as a separate process whose wall time and peak RSS (ru_maxrss from
wait4, i.e. measured by the kernel) are recorded:

1. `bench/baseline_submit.py`
2. `etl submit`                (the emulator is reset first, so it holds only etl's batches)
3. `bench/baseline_collect.py` (reads the results of the batches `etl submit` created)
4. `etl collect`               (includes the morning report, as the command does)

With `--repeat N` each pair is measured N times on a restored copy of the database (SQLite: a file
copy; PostgreSQL: `CREATE DATABASE ... TEMPLATE`), alternating which side goes first, and the RESULT
line gives the medians (of the etl seconds and of the pairs' ratios): on a VM whose speed drifts from
minute to minute, one pair can land a fast baseline beside a slow etl run.

Both sides pay interpreter start-up (the baselines import only the standard library and psycopg; `etl`
imports the SDK, SQLAlchemy and structlog). Ratios are etl / baseline. The last line printed is
`RESULT db=... docs=... submit_s=... submit_ratio=... collect_s=... collect_ratio=... submit_rss_mb=...
collect_rss_mb=...` (MB = MiB of peak resident memory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import DEFAULT_CONFIG, ROOT

HERE = Path(__file__).resolve().parent
PG_ADMIN = os.environ.get("ETL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BASELINE_TABLE = "bench_baseline_results"
BODY_BYTES = 1024
CLASSIFY_EVERY = 5  # every 5th document is a `classify` task


@dataclass
class Measured:
    name: str
    seconds: float
    rss_mb: float
    cpu_s: float
    output: str
    emulator_cpu_s: float = 0.0  # what the emulator spent answering this step (create, or the streams)


def measure(name: str, argv: list[str], env: dict[str, str], logdir: Path, cwd: Path = ROOT) -> Measured:
    """Run one child to completion: wall time, and peak RSS and CPU time as the kernel accounted them."""
    out_path = logdir / f"{name}.out"
    err_path = logdir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    output = out_path.read_text(errors="replace").strip()
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} exited {proc.returncode}\nstdout: {output}\nstderr tail:\n{tail}")
    return Measured(name, seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, output)


# -- documents -------------------------------------------------------------------------------------


def _corpus(seed: int = 42) -> str:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(5000)]
    words = rng.choices(vocab, k=400_000)
    return " ".join(words)


def documents(n: int) -> Iterator[tuple[str, str, str, str | None]]:
    """(doc_key, body, task, metadata JSON): distinct ~1 KB ASCII bodies, deterministic."""
    corpus = _corpus()
    span = len(corpus) - 2 * BODY_BYTES
    for i in range(n):
        head = f"Document {i}: "
        offset = (i * 7919) % span
        body = head + corpus[offset : offset + BODY_BYTES - len(head)]
        if i % CLASSIFY_EVERY == CLASSIFY_EVERY - 1:
            yield f"doc-{i}", body, "classify", json.dumps({"title": f"Report {i} on quarterly figures"})
        else:
            yield f"doc-{i}", body, "default", None


BASELINE_DDL = """CREATE TABLE {table} (
    doc_key TEXT, task TEXT, queue_id BIGINT, custom_id TEXT, output_text TEXT, output_json {json},
    model TEXT, stop_reason TEXT, input_tokens INTEGER, output_tokens INTEGER,
    cache_creation_input_tokens INTEGER, cache_read_input_tokens INTEGER, cost_usd DOUBLE PRECISION,
    standard_cost_usd DOUBLE PRECISION, batch_id TEXT, enqueued_at {ts}, batch_ended_at {ts}, collected_at {ts},
    PRIMARY KEY (doc_key, task)
)"""


class Database:
    """The throwaway database under test, with the few direct queries the harness needs."""

    def __init__(self, kind: str, workdir: Path, pg_admin: str) -> None:
        self.kind = kind
        self.pg_admin = pg_admin
        self.name = f"etl_bench_{uuid.uuid4().hex[:10]}"
        self._path = str(workdir / "etl.db")
        self._snapshots: list[str] = []
        if kind == "sqlite":
            self.url = f"sqlite:///{self._path}"
        else:
            with psycopg.connect(pg_admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.url = f"{pg_admin.rsplit('/', 1)[0]}/{self.name}"

    def _sqlite(self) -> sqlite3.Connection:
        return sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None)

    def load(self, n: int) -> None:
        if self.kind == "sqlite":
            conn = self._sqlite()
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO etl_queue (doc_key, body, task, metadata) VALUES (?, ?, ?, ?)", documents(n)
            )
            conn.execute("COMMIT")
            conn.execute("ANALYZE")
            conn.execute(BASELINE_DDL.format(table=BASELINE_TABLE, json="TEXT", ts="TEXT"))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            with (
                conn.cursor() as cur,
                cur.copy("COPY etl_queue (doc_key, body, task, metadata) FROM STDIN") as cp,
            ):
                for doc in documents(n):
                    cp.write_row(doc)
            conn.execute("VACUUM ANALYZE etl_queue")
            conn.execute(BASELINE_DDL.format(table=BASELINE_TABLE, json="JSONB", ts="TIMESTAMPTZ"))
            conn.execute("CHECKPOINT")

    def after_submit(self) -> None:
        """What autovacuum does between the nightly submit and the morning collect (it is off here).

        Submit updates every row twice (claimed, then submitted); on a default server autovacuum cleans
        those dead versions up within a minute or two, hours before the results are in. Without it each
        of collect's updates walks three versions of every row (`--no-vacuum` measures that case).
        """
        if self.kind == "postgresql":
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE etl_queue")
                conn.execute("CHECKPOINT")

    def snapshot(self, tag: str) -> None:
        """Keep the database as it is now, to `restore` before each repeat of a measurement."""
        if self.kind == "sqlite":
            conn = self._sqlite()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            shutil.copyfile(self._path, f"{self._path}.{tag}")
            return
        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}_{tag}"')
            conn.execute(f'CREATE DATABASE "{self.name}_{tag}" TEMPLATE "{self.name}"')
        self._snapshots.append(f"{self.name}_{tag}")

    def restore(self, tag: str) -> None:
        if self.kind == "sqlite":
            for suffix in ("-wal", "-shm"):
                Path(self._path + suffix).unlink(missing_ok=True)
            shutil.copyfile(f"{self._path}.{tag}", self._path)
            return
        with psycopg.connect(self.pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}" TEMPLATE "{self.name}_{tag}"')
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")

    def scalar(self, sql: str) -> Any:
        if self.kind == "sqlite":
            conn = self._sqlite()
            try:
                return conn.execute(sql).fetchone()[0]
            finally:
                conn.close()
        with psycopg.connect(self.url) as conn:
            row = conn.execute(sql).fetchone()
            return None if row is None else row[0]

    def column(self, sql: str) -> list[Any]:
        if self.kind == "sqlite":
            conn = self._sqlite()
            try:
                return [r[0] for r in conn.execute(sql)]
            finally:
                conn.close()
        with psycopg.connect(self.url) as conn:
            return [r[0] for r in conn.execute(sql)]

    def drop(self) -> None:
        if self.kind == "postgresql":
            with psycopg.connect(self.pg_admin, autocommit=True) as conn:
                for name in [self.name, *self._snapshots]:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Emulator:
    """`python -m etl.emulator` as its own process, zero processing time, on a free port."""

    def __init__(self, python: str, logdir: Path) -> None:
        self._err: IO[bytes] = (logdir / "emulator.err").open("wb")
        self.proc = subprocess.Popen(
            [
                python,
                "-m",
                "etl.emulator",
                "--port",
                "0",
                "--processing-seconds",
                "0",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.PIPE,
            stderr=self._err,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.base_url = ""
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line.startswith("export ANTHROPIC_BASE_URL="):
                self.base_url = line.split("=", 1)[1]
                break
        if not self.base_url:
            raise SystemExit("the emulator did not start; see emulator.err")

    def cpu_s(self) -> float:
        """User + system CPU seconds the emulator process has used so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset(self) -> None:
        request = urllib.request.Request(
            f"{self.base_url}/_emulator/reset",
            data=b"{}",
            method="POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def pairs(
    n: int, baseline: Callable[[], Measured], etl: Callable[[], Measured], restore: Callable[[], None]
) -> list[tuple[Measured, Measured]]:
    """`n` (baseline, etl) measurements, the database restored before each one after the first.

    The order alternates (baseline first, then etl first, ...; the last pair runs etl last, so the
    database and the emulator are left as etl made them): on a machine whose speed drifts, neither side
    gets the fast minutes more often. The baselines do etl's bookkeeping (queue rows updated), so every
    step after the first starts from a restored copy.
    """
    out: list[tuple[Measured, Measured]] = []
    first = True
    for k in range(n):
        order = [baseline, etl] if (n - 1 - k) % 2 == 0 else [etl, baseline]
        got: dict[Callable[[], Measured], Measured] = {}
        for step in order:
            if not first:
                restore()
            first = False
            got[step] = step()
        out.append((got[baseline], got[etl]))
    return out


def summary(runs: list[tuple[Measured, Measured]]) -> tuple[float, float, float, float]:
    """(median etl seconds, median of the pairs' etl/baseline wall ratios, median of their CPU ratios,
    highest etl peak RSS)."""
    return (
        statistics.median(e.seconds for _, e in runs),
        statistics.median(e.seconds / b.seconds for b, e in runs),
        statistics.median(e.cpu_s / max(b.cpu_s, 0.01) for b, e in runs),
        max(e.rss_mb for _, e in runs),
    )


class WarmChild:
    """`bench/warm_child.py`: one process with etl's imports and API client loaded, as in `etl run`."""

    def __init__(self, python: str, env: dict[str, str], logdir: Path, cwd: Path) -> None:
        self._err = (logdir / "warm.err").open("wb")
        self.proc = subprocess.Popen(
            [python, str(HERE / "warm_child.py")],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            cwd=cwd,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the warm process did not start; see warm.err")

    def run(self, name: str, argv: list[str] | None = None) -> Measured:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"step": name, "argv": argv or []}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the warm process died during {name}; see warm.err")
        got = json.loads(line)
        return Measured(name, got["seconds"], got["rss_mb"], got["cpu_s"], got["output"])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._err.close()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    python = sys.executable
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="etl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shape = "warm, inside one process as in `etl run`" if args.warm else "fresh processes"
    print(f"bench: {args.docs} documents on {args.db} ({shape}); logs in {workdir}", flush=True)

    db = Database(args.db, workdir, args.pg_admin)
    emulator: Emulator | None = None
    warm: WarmChild | None = None
    tree = (args.etl_tree or ROOT).resolve()
    try:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
        env = {
            **base_env,
            "ETL_CONFIG": str(args.config),
            "ETL_DATABASE_URL": db.url,
            "ANTHROPIC_API_KEY": "bench-key",
        }
        if args.etl_tree:
            env["PYTHONPATH"] = str(tree)
        etl = [python, "-m", "etl.cli"]
        # An installed package carries its bytecode (pip compiles it); this source tree may not, and with
        # PYTHONDONTWRITEBYTECODE set every process would compile `etl` again (0.25 s). Both sides get it.
        for package in (tree / "etl", ROOT / "etl", HERE):
            subprocess.run(
                [python, "-m", "compileall", "-q", str(package)], check=True, stdout=subprocess.DEVNULL
            )
        measure("db_upgrade", [*etl, "db", "upgrade"], env, workdir, tree)
        t = time.perf_counter()
        db.load(args.docs)
        print(f"bench: enqueued {args.docs} documents in {time.perf_counter() - t:.1f}s", flush=True)

        emulator = Emulator(python, workdir)
        env["ANTHROPIC_BASE_URL"] = emulator.base_url
        em = emulator
        if args.warm:
            warm = WarmChild(python, env, workdir, tree)
        steps = Steps(args, db, em, warm, env, workdir, tree)
        db.snapshot("loaded")
        submits = pairs(
            max(1, args.repeat), steps.baseline_submit, steps.submit, lambda: db.restore("loaded")
        )
        steps.batch_ids = db.column("SELECT batch_id FROM etl_batches WHERE batch_id IS NOT NULL ORDER BY id")
        if not args.no_vacuum:
            db.after_submit()
        db.snapshot("submitted")
        collects = pairs(
            max(1, args.repeat), steps.baseline_collect, steps.collect, lambda: db.restore("submitted")
        )
    finally:
        if warm is not None:
            warm.stop()
        if emulator is not None:
            emulator.stop()
        if not args.keep:
            db.drop()
            if args.workdir is None and args.profile is None:
                shutil.rmtree(workdir, ignore_errors=True)
    _print_results(args, submits, collects, steps.batch_ids)
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="etl config (tasks and caps)")
    p.add_argument(
        "--pg-admin", default=PG_ADMIN, help="PostgreSQL URL used to create the throwaway database"
    )
    p.add_argument("--workdir", type=Path, help="where logs (and the SQLite file) go; default a temp folder")
    p.add_argument("--keep", action="store_true", help="keep the database and the work folder")
    p.add_argument(
        "--no-vacuum",
        action="store_true",
        help="PostgreSQL: collect right after submit, without the VACUUM autovacuum would have run in between",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each baseline/etl pair this many times (the database restored before each), "
        "alternating which goes first; ratios are the median of the pairs' ratios",
    )
    p.add_argument(
        "--warm",
        action="store_true",
        help="the deployed shape: every step inside one process whose imports and API client are loaded, "
        "as in a running `etl run` (bench/warm_child.py); the baselines run warm too",
    )
    p.add_argument(
        "--etl-tree",
        type=Path,
        help="run `etl` from another checkout (e.g. an archive of the previous commit), for before/after",
    )
    p.add_argument(
        "--profile",
        choices=["cprofile", "py-spy", "py-spy-gil"],
        help="also write a profile of each etl process to the work folder (timings then include the profiler)",
    )
    return p.parse_args(argv)


class Steps:
    """The four measured steps, each checked for its outcome; fresh processes, or the warm one."""

    def __init__(
        self,
        args: argparse.Namespace,
        db: Database,
        emulator: Emulator,
        warm: WarmChild | None,
        env: dict[str, str],
        workdir: Path,
        tree: Path,
    ) -> None:
        self.args, self.db, self.em, self.warm = args, db, emulator, warm
        self.env, self.workdir, self.tree = env, workdir, tree
        self.batch_ids: list[str] = []
        self.cfg = str(args.config)

    def _timed(self, run: Callable[[], Measured]) -> Measured:
        before = self.em.cpu_s()
        m = run()
        m.emulator_cpu_s = self.em.cpu_s() - before
        return m

    def _etl(self, command: str) -> Measured:
        if self.warm is not None:
            return self.warm.run(f"etl_{command}")
        return measure(f"etl_{command}", self._etl_argv(command), self.env, self.workdir, self.tree)

    def _baseline(self, name: str, argv: list[str]) -> Measured:
        if self.warm is not None:
            return self.warm.run(name, argv)
        return measure(name, [sys.executable, str(HERE / f"{name}.py"), *argv], self.env, self.workdir)

    def _etl_argv(self, command: str) -> list[str]:
        python, workdir = sys.executable, self.workdir
        if self.args.profile == "cprofile":
            return [
                python,
                "-m",
                "cProfile",
                "-o",
                str(workdir / f"{command}.prof"),
                "-m",
                "etl.cli",
                command,
            ]
        if self.args.profile in ("py-spy", "py-spy-gil"):
            spy = shutil.which("py-spy") or str(Path(python).parent / "py-spy")
            out = str(workdir / f"{command}.speedscope.json")
            return [
                spy,
                "record",
                "-f",
                "speedscope",
                "-o",
                out,
                "-r",
                "200",
                # --idle: where the time goes, waits included; --gil: only the thread holding the GIL,
                # which is where the process's own CPU goes (waits on the database and the socket left out)
                "--idle" if self.args.profile == "py-spy" else "--gil",
                "--",
                python,
                "-m",
                "etl.cli",
                command,
            ]
        return [python, "-m", "etl.cli", command]

    def baseline_submit(self) -> Measured:
        self.em.reset()
        m = self._timed(lambda: self._baseline("baseline_submit", [self.db.url, self.em.base_url, self.cfg]))
        self._expect("submitted", m)
        return m

    def submit(self) -> Measured:
        self.em.reset()  # the emulator then holds only this submit's batches (the last pair runs etl last)
        m = self._timed(lambda: self._etl("submit"))
        self._expect("submitted", m)
        return m

    def baseline_collect(self) -> Measured:
        argv = [self.db.url, self.em.base_url, self.cfg, BASELINE_TABLE, *self.batch_ids]
        m = self._timed(lambda: self._baseline("baseline_collect", argv))
        rows = self.db.scalar(f"SELECT count(*) FROM {BASELINE_TABLE}")
        if rows != self.args.docs:
            raise SystemExit(f"the collect baseline loaded {rows} of {self.args.docs} rows")
        self._expect("done", m)
        return m

    def collect(self) -> Measured:
        m = self._timed(lambda: self._etl("collect"))
        self._expect("done", m)
        results = self.db.scalar("SELECT count(*) FROM etl_results")
        if results != self.args.docs:
            raise SystemExit(f"expected {self.args.docs} results, found {results}")
        return m

    def _expect(self, status: str, m: Measured) -> None:
        n = self.db.scalar(f"SELECT count(*) FROM etl_queue WHERE status = '{status}'")
        if n != self.args.docs:
            raise SystemExit(f"{m.name} left {n} of {self.args.docs} rows {status}: {m.output}")


def _print_results(
    args: argparse.Namespace,
    submits: list[tuple[Measured, Measured]],
    collects: list[tuple[Measured, Measured]],
    batch_ids: list[str],
) -> None:
    print(
        f"{'process':<18}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}{'emulator cpu s':>16}{'ratio':>8}{'cpu ratio':>11}"
    )
    for runs in (submits, collects):
        for b, e in runs:
            print(f"{b.name:<18}{b.seconds:>9.2f}{b.cpu_s:>9.2f}{b.rss_mb:>13.1f}{b.emulator_cpu_s:>16.2f}")
            print(
                f"{e.name:<18}{e.seconds:>9.2f}{e.cpu_s:>9.2f}{e.rss_mb:>13.1f}{e.emulator_cpu_s:>16.2f}"
                f"{e.seconds / b.seconds:>8.2f}{e.cpu_s / max(b.cpu_s, 0.01):>11.2f}"
            )
    print(f"batches: {len(batch_ids)}; etl submit said: {submits[-1][1].output}")
    submit_s, submit_ratio, submit_cpu, submit_rss = summary(submits)
    collect_s, collect_ratio, collect_cpu, collect_rss = summary(collects)
    if args.repeat > 1:
        print(f"medians of {args.repeat} pairs (RSS: the highest)")
    print(
        f"RESULT db={args.db} docs={args.docs} submit_s={submit_s:.2f} submit_ratio={submit_ratio:.2f} "
        f"collect_s={collect_s:.2f} collect_ratio={collect_ratio:.2f} submit_rss_mb={submit_rss:.0f} "
        f"collect_rss_mb={collect_rss:.0f} submit_cpu_ratio={submit_cpu:.2f} collect_cpu_ratio={collect_cpu:.2f} "
        f"warm={'yes' if args.warm else 'no'}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
