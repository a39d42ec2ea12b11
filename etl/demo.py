"""`etl demo`: the whole cycle in a few seconds, on a fresh SQLite file, against an in-process emulator.

Nothing to install and no API key: the emulator plays the Batches API on a virtual clock, so "the night"
passes by advancing that clock (and the demo's own clock with it) instead of sleeping.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from etl import config as config_mod
from etl import live, pipeline, report
from etl.clock import utcnow
from etl.emulator import EmulatorConfig, EmulatorControl, EmulatorServer
from etl.parts import Parts
from etl.store import migrate
from etl.store.schema import results

NIGHT = timedelta(hours=7)
DEMO_KEY = "demo-key-for-the-local-emulator"
OVERLOADED = ("doc-004", "doc-011", "doc-023")  # come back `overloaded_error`, are re-queued
INVALID = "doc-017"  # comes back `invalid_request_error`: resending cannot help, dead-lettered
URGENT = "urgent-001"  # the one document someone is waiting for: answered live, in seconds
LAST_CHANCE = "doc-030"  # already tried twice; overloaded once more, it reaches max_attempts


class _Style:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, s: str) -> str:
        return f"\033[{code}m{s}\033[0m" if self.enabled else s

    def bold(self, s: str) -> str:
        return self._wrap("1", s)

    def dim(self, s: str) -> str:
        return self._wrap("2", s)

    def green(self, s: str) -> str:
        return self._wrap("32", s)

    def yellow(self, s: str) -> str:
        return self._wrap("33", s)


def _samples() -> list[dict[str, Any]]:
    raw = resources.files("etl.samples").joinpath("documents.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


@contextmanager
def _demo_config_path() -> Iterator[Path]:
    with resources.as_file(resources.files("etl.samples").joinpath("demo.toml")) as path:
        yield path


def _enqueue(parts: Parts, docs: list[dict[str, Any]], max_attempts: int) -> dict[str, int]:
    """Plain SQL, as any other system would write to the queue. Returns doc_key -> queue id."""
    rows = [
        {
            "doc_key": d["doc_key"],
            "body": d["body"],
            "task": d.get("task", "default"),
            "metadata": json.dumps(d["metadata"]) if d.get("metadata") else None,
            "attempts": max_attempts - 1 if d["doc_key"] == LAST_CHANCE else 0,
        }
        for d in docs
    ]
    with parts.db.main.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO etl_queue (doc_key, body, task, metadata, attempts) "
                "VALUES (:doc_key, :body, :task, :metadata, :attempts)"
            ),
            rows,
        )
        ids = conn.execute(text("SELECT doc_key, id FROM etl_queue")).all()
    return {k: int(v) for k, v in ids}


def _faults(ids: dict[str, int]) -> dict[str, Any]:
    # custom_ids are q<row>_<intent>_<installation> (etl.prompt.custom_id): the rules match on the row
    overloaded = "(" + "|".join(f"q{ids[k]}" for k in (*OVERLOADED, LAST_CHANCE)) + ")_.*"
    return {
        "outcomes": [
            {
                "custom_id": f"q{ids[INVALID]}_.*",
                "outcome": "errored",
                "error_type": "invalid_request_error",
                "message": "messages.0.content: the document could not be parsed",
            },
            {"custom_id": overloaded, "outcome": "errored", "error_type": "overloaded_error"},
        ]
    }


class _Clock:
    """The demo's clock: the wall clock plus the nights the demo has let pass."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset


@dataclass
class _Demo:
    """What every step of the demo uses."""

    s: _Style
    parts: Parts
    control: EmulatorControl
    clock: _Clock
    docs: list[dict[str, Any]] = field(default_factory=list)

    def say(self, title: str) -> None:
        print(f"\n{self.s.bold('==> ' + title)}")

    def night_passes(self) -> None:
        """The emulator's clock and the pipeline's move on a night together; nobody sleeps."""
        self.control.advance(NIGHT.total_seconds())
        self.clock.offset += NIGHT


def run_demo(directory: Path | None = None, keep: bool = False) -> int:
    s = _Style(sys.stdout.isatty())
    workdir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="etl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "demo.db"
    db_path.unlink(missing_ok=True)
    clock = _Clock()
    emulator = EmulatorServer(EmulatorConfig(port=0, processing_seconds=2, seed=7)).start()
    env = {
        "ETL_DATABASE_URL": f"sqlite:///{db_path}",
        "ANTHROPIC_API_KEY": DEMO_KEY,
        "ANTHROPIC_BASE_URL": emulator.base_url,
    }
    parts: Parts | None = None
    try:
        with _demo_config_path() as path:
            cfg = config_mod.load(env, path)
        parts = Parts.open(cfg, clock=clock)
        parts.api.warm()  # the SDK loads while the schema is made, as it has in a running daemon
        print(
            s.bold("etl demo") + s.dim(f"  (database {db_path}, Batches API emulator at {emulator.base_url})")
        )
        demo = _Demo(s, parts, EmulatorControl(emulator.base_url), clock)
        for step in STEPS:
            step(demo)
        _use_it_for_real(s, db_path, kept=bool(keep or directory))
        return 0
    finally:
        if parts is not None:
            parts.close()
        emulator.stop()
        if not keep and directory is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _schema(d: _Demo) -> None:
    d.say("1. Create the schema")
    for _role, before, after in migrate.upgrade(d.parts.db.main, d.parts.db.warehouse):
        print(f"   schema {before or 'empty'} -> {after}")


def _enqueue_samples(d: _Demo) -> None:
    d.say("2. Enqueue sample documents (plain SQL INSERT INTO etl_queue)")
    max_attempts = d.parts.config.submit.max_attempts
    d.docs = _samples()
    ids = _enqueue(d.parts, d.docs, max_attempts)
    tasks: dict[str, int] = {}
    for doc in d.docs:
        tasks[doc.get("task", "default")] = tasks.get(doc.get("task", "default"), 0) + 1
    print(f"   {len(d.docs)} documents: " + ", ".join(f"{n} for task '{t}'" for t, n in tasks.items()))
    d.control.set_faults(**_faults(ids))
    print(
        d.s.dim(
            f"   the emulator will answer overloaded_error for {', '.join(OVERLOADED)} and {LAST_CHANCE} "
            f"(already tried {max_attempts - 1} times), invalid_request_error for {INVALID}"
        )
    )


def _urgent(d: _Demo) -> None:
    d.say("2b. One urgent document: someone is waiting for it (INSERT ... mode = 'live')")
    d.control.set_live(latency_seconds=0.3)  # a live call takes a moment, as the real API's does
    _ = d.parts.api.provider  # loaded since step 1 (in `etl run` it is loaded at start-up)
    with d.parts.db.main.begin() as conn:
        conn.execute(
            text("INSERT INTO etl_queue (doc_key, body, mode) VALUES (:k, :b, 'live')"),
            {
                "k": URGENT,
                "b": "Customer escalation: shipment 7781 is stuck in customs. Summarise for the call.",
            },
        )
    started = time.perf_counter()
    answered = live.run(d.parts.config, d.parts.db, d.parts.api, d.parts.clock, once=True)
    with d.parts.db.warehouse.connect() as conn:
        cost = conn.execute(  # through the column's type: money is stored scaled on SQLite
            select(results.c.cost_usd).where(results.c.doc_key == URGENT, results.c.mode == "live")
        ).scalar_one_or_none()
    print(
        f"   {d.s.green(URGENT + ' answered live')} in {time.perf_counter() - started:.1f} s through the Messages "
        f"API ({answered.succeeded} call, ${cost or 0:.6f} at the standard price, "
        f"${(cost or 0) * d.parts.config.pricing.batch_discount:.6f} in the batch)"
    )
    print(f"   the other {len(d.docs)} documents wait for the night")


def _night(d: _Demo) -> None:
    d.say("3. Night: the submit job")
    out = pipeline.submit(d.parts.config, d.parts.db, d.parts.api, d.parts.me, d.parts.clock)
    print(f"   {out.documents} documents sent in {out.batches} batches (one create call each, never retried)")
    for batch_id in out.batch_ids:
        print(d.s.dim(f"     {batch_id}"))
    d.say(f"4. Time passes ({NIGHT.seconds // 3600} hours on the emulator's clock, not yours)")
    d.night_passes()
    print(f"   it is now {d.clock():%Y-%m-%d %H:%M} UTC for the pipeline")


def _morning(d: _Demo) -> None:
    d.say("5. Morning: the collect job, then the report")
    col = pipeline.collect(d.parts.config, d.parts.db, d.parts.api, d.parts.me, d.parts.clock)
    print(
        f"   {col.batches_collected} batches collected: {d.s.green(str(col.succeeded) + ' succeeded')}, "
        f"{d.s.yellow(str(col.requeued) + ' re-queued')} for the next night, "
        f"{d.s.yellow(str(col.dead) + ' dead-lettered')}"
    )
    body = report.morning(d.parts.config, d.parts.db, d.parts.clock())
    print()
    print("\n".join("   " + line for line in report.render(body).splitlines()))


def _next_night(d: _Demo) -> None:
    d.say("6. The next night: the overload has passed, the re-queued documents go again")
    d.control.clear_faults()
    again = pipeline.submit(d.parts.config, d.parts.db, d.parts.api, d.parts.me, d.parts.clock)
    d.night_passes()
    col2 = pipeline.collect(d.parts.config, d.parts.db, d.parts.api, d.parts.me, d.parts.clock)
    print(f"   {again.documents} re-sent; {col2.succeeded} succeeded")
    with d.parts.db.main.connect() as conn:
        counts: dict[str, int] = {
            str(k): int(v)
            for k, v in conn.execute(text("SELECT status, count(*) FROM etl_queue GROUP BY status"))
        }
        dead = conn.execute(text("SELECT doc_key, reason FROM etl_queue WHERE status = 'dead'")).all()
    print("   queue: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for doc_key, reason in dead:
        print(d.s.yellow(f"   dead: {doc_key}: {reason}"))


STEPS: tuple[Callable[[_Demo], None], ...] = (
    _schema,
    _enqueue_samples,
    _urgent,
    _night,
    _morning,
    _next_night,
)


def _use_it_for_real(s: _Style, db_path: Path, *, kept: bool) -> None:
    print(f"\n{s.bold('==> Use it for real')}")
    print(
        "   export ANTHROPIC_API_KEY=sk-ant-...            # or systemd LoadCredential=anthropic_api_key\n"
        "   export ETL_DATABASE_URL=postgresql://etl@db/etl  # default: SQLite at var/etl.db\n"
        "   etl db upgrade                                 # create the schema\n"
        "   etl enqueue documents.jsonl                    # or INSERT INTO etl_queue from anywhere\n"
        "   etl run                                        # the daemon: nightly submit, morning report\n"
        "   systemd: see docs/deploy.md (deploy/systemd/etl.service); container: the Dockerfile"
    )
    if kept:
        print(
            s.dim(
                f"\n   demo database kept at {db_path}: try ETL_DATABASE_URL=sqlite:///{db_path} etl status"
            )
        )
