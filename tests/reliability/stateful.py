"""The fault model that writes its own cases: a Hypothesis state machine over the whole pipeline.

Steps interleave enqueue (good, bad and duplicate rows, keys of any length and alphabet), submit, collect,
reconcile, clock steps on either side (the host's: `Harness.clock`; the API's: the emulator's virtual clock
and its clock offset fault), API faults at every endpoint (statuses, resets, ambiguous creates, results
streams that break at any byte), process crashes at any failpoint or any SQL statement, and database
connection kills at any SQL statement. After every step the checker judges the invariants against the
emulator's ledger; at the end of each example the faults are lifted and a completion run must settle
everything (`teardown`).

Runs are in-process (see docs/survival.md, "The stateful fault model", for why): each `etl` run is a fresh
`Harness` (new engine, new SDK client) like a new process. A crash is an exception raised at the failpoint or
before the chosen statement: every open transaction rolls back as the database would roll back a dead
connection's, and the runtime's connections are then discarded. A database kill terminates every
connection of the database (PostgreSQL: `pg_terminate_backend`) or closes the run's connection under it
and disposes of the pool (SQLite), and the run goes on to see what a real process would see.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import Engine, text
from sqlalchemy import event as sa_event

from etl import config as config_mod
from etl import failpoints, life, liveness
from etl.api import Api
from etl.emulator import EmulatorControl, EmulatorServer
from etl.emulator.model import reply_text
from etl.errors import EtlError, environmental
from etl.prompt import Row, build_params, custom_id
from etl.store import state
from etl.store.databases import Databases
from etl.store.engine import make_engine
from etl.store.schema import metadata, warehouse_metadata
from tests.conftest import API_KEY, TASKS_TOML, write_config
from tests.harness import Harness
from tests.ledger import by_row
from tests.reliability import checker
from tests.reliability.lines import RESULT_LINES

PROCESSING_SECONDS = 60  # the `emulator` fixture's
SUBMIT = {
    "max_attempts": 3,
    "max_requests_per_batch": 4,
    "claim_lease_seconds": 120,
    "reconcile_grace_seconds": 600,
    "create_timeout_seconds": 2.0,
}
CONFIG = """
[api]
timeout_seconds = 5

[submit]

[collect]
chunk_size = 2
stream_retries = 1
stream_backoff_seconds = 0.01
stream_timeout_seconds = 2
"""
CYCLE = timedelta(seconds=SUBMIT["claim_lease_seconds"] + SUBMIT["reconcile_grace_seconds"])
MAX_ADVANCE = 20 * 86400  # total forward time per example: results stay well inside their 29 days

# `submit.during_create` fires on a timer thread in the middle of the HTTP call: in-process it is the same
# database state as `submit.after_create` (batch made, id not recorded, intent `sending`), which is drawn.
POINTS = tuple(p for p in failpoints.POINTS if p != "submit.during_create")
COMMANDS = ("submit", "collect", "reconcile")
MINUTE, HOUR, DAY = 60, 3600, 86400
STEPS = (MINUTE, 5 * MINUTE, 10 * MINUTE, 20 * MINUTE, HOUR, 6 * HOUR, DAY, 3 * DAY)


class Crash(BaseException):
    """A simulated SIGKILL before a SQL statement: a BaseException, so no `except Exception` swallows it."""


# --- generated input ------------------------------------------------------------------------------------


def _noise(seed: int, n: int) -> str:
    """`n` characters from a wide alphabet, incompressible (an index entry of a repeated character is
    compressed below PostgreSQL's btree limit; a real long key is not)."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x21, 0xD7FF)) for _ in range(n))


keys = st.one_of(
    st.text(max_size=12),  # any alphabet: NUL, invisible, RTL, emoji, empty
    st.builds(_noise, st.integers(0, 2**32), st.integers(100, 3500)),  # long keys PostgreSQL cannot compress
)
good_bodies = st.text(st.characters(categories=["L", "N", "Zs", "P"]), min_size=1, max_size=30).filter(
    lambda s: any(c.isalnum() for c in s)
)
bad_bodies = st.sampled_from(["", "   ", "\n\t", "\u200b", "\ufeff\u200b", "\u200b \ufeff \u2060"])
rows = st.one_of(
    st.tuples(st.just("good"), keys, good_bodies, st.just("default")),
    st.tuples(st.just("bad_body"), keys, bad_bodies, st.just("default")),
    st.tuples(st.just("bad_task"), keys, good_bodies, st.just("no_such_task")),
)
crashes = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(POINTS), st.integers(1, 2)),
    st.tuples(st.just("statement"), st.integers(1, 40)),
)
db_kills = st.one_of(st.none(), st.integers(1, 40))


# `extra_line` ids, resolved when armed (FaultModel.arm): row 1 of intent 1 of ours (a duplicate in
# intent 1's batch, another batch's row in any other), row 1 of intent 1 of the other installation, and
# an id nobody of ours writes.
EXTRA_LINE_IDS = ("@ours", "@other_installation", "@stranger")


def _faults(*endpoints: str) -> st.SearchStrategy[dict[str, Any]]:
    """API faults at the given endpoints: error statuses, connection resets, ambiguous creates, and for
    results streams that end early, cut a line, reset after some lines or break at any byte."""
    out: list[st.SearchStrategy[dict[str, Any]]] = [
        st.fixed_dictionaries(
            {
                "endpoint": st.sampled_from(endpoints),
                "action": st.just("status"),
                "status": st.sampled_from([429, 500, 503, 529, 401]),
                "retry_after": st.just(0.001),  # the SDK retries nothing here anyway (read_retries=0)
            }
        ),
        st.fixed_dictionaries({"endpoint": st.sampled_from(endpoints), "action": st.just("reset")}),
    ]
    if "create" in endpoints:
        out += [
            st.just({"endpoint": "create", "action": "ambiguous", "drop": True}),
            st.just({"endpoint": "create", "action": "spend_limit"}),
        ]
    if "retrieve" in endpoints:
        out.append(st.just({"endpoint": "retrieve", "action": "not_found"}))
    if "list" in endpoints:
        out.append(st.just({"endpoint": "list", "action": "unordered"}))  # a page's newest entry last
    if "results" in endpoints:
        out += [
            st.fixed_dictionaries(
                {
                    "endpoint": st.just("results"),
                    "action": st.just("break_at"),
                    "at_byte": st.integers(0, 4000),
                }
            ),
            st.fixed_dictionaries(
                {
                    "endpoint": st.just("results"),
                    "action": st.sampled_from(["truncate", "cut_line", "stream_reset", "break_at"]),
                    "after_lines": st.integers(0, 5),
                    "at_byte": st.integers(0, 400),
                }
            ),
            # one more line: another of our batches' row, a duplicate, another installation's, a stranger's
            st.fixed_dictionaries(
                {
                    "endpoint": st.just("results"),
                    "action": st.just("extra_line"),
                    "custom_id": st.sampled_from(EXTRA_LINE_IDS),
                }
            ),
        ]
    return st.one_of(out)


ALL_ENDPOINTS = ("create", "retrieve", "list", "cancel", "results")
# Each command's fault is drawn mostly from the calls it makes (submit: list, then create; collect: list
# and results for reconciliation, then retrieve and results; reconcile: list and results), sometimes from
# any endpoint (left armed, it meets a later run).
run_faults = {
    "submit": st.one_of(st.none(), _faults("create"), _faults("create", "list"), _faults(*ALL_ENDPOINTS)),
    "collect": st.one_of(
        st.none(), _faults("results"), _faults("retrieve", "results", "list"), _faults(*ALL_ENDPOINTS)
    ),
    "reconcile": st.one_of(
        st.none(), _faults("results"), _faults("list", "results"), _faults(*ALL_ENDPOINTS)
    ),
}
waits = st.sampled_from([0, 2 * MINUTE, 15 * MINUTE])
signed_steps = st.sampled_from(STEPS).flatmap(lambda s: st.sampled_from([s, -s]))


# --- the world one test shares across its examples --------------------------------------------------------


@dataclass
class World:
    """One database (SQLite file or throwaway PostgreSQL), migrated once, and one emulator, for one test;
    `reset` empties both between examples (much cheaper than a new database each time)."""

    db: str
    url: str
    engine: Engine
    config_path: Path
    emulator: EmulatorServer
    control: EmulatorControl
    combos: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    provider: Any = None
    runs: int = 0  # every in-process `etl` run, completion runs included
    run_seconds: float = 0.0
    actors: Counter[str] = field(default_factory=Counter)  # issue 20's actors and faults, as drawn
    other_url: str = ""  # a second installation on the same API account (SQLite, tmpfs when there is one)
    other_engine: Engine | None = None

    def reset(self) -> None:
        tables = [t.name for t in reversed(metadata.sorted_tables)] + [
            t.name for t in warehouse_metadata.sorted_tables
        ]
        with self.engine.begin() as conn:
            if self.db == "postgresql":
                conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
            else:
                for name in tables:
                    conn.execute(text(f"DELETE FROM {name}"))
                with suppress(Exception):
                    conn.execute(text("DELETE FROM sqlite_sequence"))
        if self.other_engine is not None:
            with self.other_engine.begin() as conn:
                for name in tables:
                    conn.execute(text(f"DELETE FROM {name}"))
                with suppress(Exception):
                    conn.execute(text("DELETE FROM sqlite_sequence"))
        self.control.reset()
        self.examples += 1

    def kill_connections(self, dbapi_cursor: Any, engine: Engine) -> None:
        """Every connection of the database dies (PostgreSQL), or the run's connection is closed under it
        and its pool disposed of (SQLite, which has no server to kill connections)."""
        if self.db == "postgresql":
            with self.engine.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
        else:
            dbapi_cursor.connection.close()
            engine.pool.dispose()


class _Unclosable:
    """The shared SDK client, as each run's `Harness` sees it: closing it is a no-op."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def close(self) -> None:
        pass


def make_world(db: str, url: str, tmp: Path, emulator: EmulatorServer) -> World:
    from etl import logs
    from etl.store import migrate

    logs.configure("error")  # the runs' own events would be most of the test's time and output
    engine = make_engine(url)
    if db == "postgresql":
        # No WAL flush wait at each commit (the disk is shared by the whole CI run): commits stay atomic and
        # visible at once, only a crash of the PostgreSQL server itself could lose one, which no step does.
        with engine.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{engine.url.database}" SET synchronous_commit = off'))
            conn.commit()
        engine.dispose()
    migrate.upgrade(engine, engine)
    world = World(
        db,
        url,
        engine,
        write_config(
            tmp / "etl-stateful.toml", CONFIG + TASKS_TOML, **{f"submit.{k}": v for k, v in SUBMIT.items()}
        ),
        emulator,
        EmulatorControl(emulator.base_url),
    )
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp
    world.other_url = f"sqlite:///{folder / f'etl-other-installation-{os.getpid()}-{id(world)}.db'}"
    world.other_engine = make_engine(world.other_url)
    migrate.upgrade(world.other_engine, world.other_engine)
    return world


@dataclass
class Twin:
    """A live process of the same hostname (etl.liveness): its name, its proof of life and its claim."""

    name: str
    owner: str = ""
    conn: Any = None  # PostgreSQL: the session holding its advisory lock
    fd: int | None = None  # SQLite: its flocked file
    intent: int = 0
    lease_until: datetime = datetime.min
    lock_lost: bool = False  # PostgreSQL: a connection kill ended its lock session (it looks dead now)

    def die(self) -> None:
        """As the kernel and the database do at a process's death: the lock is dropped, nothing cleaned."""
        if self.conn is not None:
            self.conn.invalidate()
        if self.fd is not None:
            os.close(self.fd)


# --- the machine -----------------------------------------------------------------------------------------


class FaultModel(RuleBasedStateMachine):
    world: World  # set by the test (a subclass per test)

    def __init__(self) -> None:
        super().__init__()
        self.w = self.world
        self.w.reset()
        self.cfg = config_mod.load(
            {
                "ETL_DATABASE_URL": self.w.url,
                "ANTHROPIC_BASE_URL": self.w.emulator.base_url,
                "ANTHROPIC_API_KEY": API_KEY,
            },
            self.w.config_path,
        )
        self.host_skew = 0.0
        self.max_host_skew = 0.0
        self.api_offset = 0.0
        self.advanced = 0.0
        self.keys: list[str] = []
        self.log: list[str] = []
        self.odd_rows: set[int] = set()  # rows answered by a generated line (odd_results), not the model
        self.odd_due: dict[int, str] = {}  # odd rows queued when their line was set: its custom_id rule
        self.odd_hits: Counter[str] = Counter()  # the odd rules' hits before the completion re-installed them
        self.never_bill: set[str] = set()  # rows a newer queued row of their (doc_key, task) superseded
        self.clean_run = False  # the last run met no fault
        self.host_jumped = False
        self.other_docs = 0
        self.twin: Twin | None = None

    # --- clocks ---------------------------------------------------------------------------------------
    def host_now(self) -> datetime:
        return self.w.emulator.clock.now() + timedelta(seconds=self.host_skew)

    def _advance(self, seconds: float) -> None:
        self.w.control.advance(seconds)
        self.advanced += seconds

    # --- one `etl` run, as a process would run it -----------------------------------------------------
    @contextmanager
    def _runtime(
        self,
        crash: Any,
        db_kill: int | None,
        fired: list[str],
        disk_full: int | None = None,
        url: str | None = None,
    ) -> Iterator[Harness]:
        from etl.provider import Provider

        engine = make_engine(url or self.w.url)
        cfg = self.cfg
        if self.w.provider is None:
            # read_retries=0: every injected fault reaches etl's own code instead of being retried away.
            # One SDK client for the whole test (building one costs ~30 ms of TLS setup); `close` is kept
            # from it, and its connections die with each emulator reset or fault anyway.
            self.w.provider = _Unclosable(
                Provider(
                    api_key=API_KEY,
                    base_url=self.w.emulator.base_url,
                    timeout=cfg.api_timeout_seconds,
                    create_timeout=cfg.submit.create_timeout_seconds,
                    read_retries=0,
                )
            )
        provider = self.w.provider

        def factory() -> Any:
            return provider

        statements = [0]

        def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            statements[0] += 1
            n = statements[0]
            if disk_full is not None and n >= disk_full and _writes(statement):
                fired.append("disk_full")
                raise _disk_full_error(self.w.db)
            if db_kill == n:
                fired.append("db_kill")
                self.w.kill_connections(cursor, engine)
                if self.w.db == "postgresql" and self.twin is not None:
                    self.twin.lock_lost = True  # every session of the database died, its lock's too
            if crash is not None and crash[0] == "statement" and crash[1] == n:
                fired.append("crash@statement")
                raise Crash(f"simulated kill before statement {n}")

        sa_event.listen(engine, "before_cursor_execute", before)
        if crash is not None and crash[0] != "statement":
            failpoints.configure({failpoints.ENV: f"{crash[0]}=raise@{crash[1]}"})
        rt = Harness(config=cfg, db=Databases.one(engine), api=Api(factory), clock=self.host_now)
        try:
            yield rt
        finally:
            failpoints.configure({})
            rt.close()

    def execute(
        self,
        command: str,
        crash: Any = None,
        db_kill: int | None = None,
        *,
        count: bool = True,
        disk_full: int | None = None,
    ) -> str:
        from etl import pipeline, reconciler

        fired: list[str] = []
        before = self._rules_left()
        outcome = "ok"
        started = time.perf_counter()
        try:
            with self._runtime(crash, db_kill, fired, disk_full) as rt:
                if command == "reconcile":
                    reconciler.run(rt.config, rt.db, rt.api, rt.clock, rt.should_stop)
                else:
                    {"submit": pipeline.submit, "collect": pipeline.collect}[command](
                        rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
                    )
        except failpoints.FailpointHit as hit:
            fired.append(f"crash@{hit}")
            outcome = "crashed"
        except Crash:
            outcome = "crashed"
        except EtlError as exc:
            outcome = f"exit {exc.exit_code}"
        except Exception as exc:  # a traceback: acceptable only as the effect of a killed connection
            if "disk_full" in fired and environmental(exc) is not None:
                outcome = "exit 74"  # what the CLI says: the machine's fault, named, no traceback
            elif "db_kill" not in fired:
                raise AssertionError(
                    f"etl {command} died with a traceback and no fault to explain it"
                ) from exc
            else:
                outcome = f"died: {type(exc).__name__}"
        self.w.runs += 1
        self.w.run_seconds += time.perf_counter() - started
        after = self._rules_left()
        api = sorted(f"{k[0]}:{k[1]}" for k, n in before.items() if after.get(k, 0) < n)
        # A run that met no fault has reconciled everything it could: only right after one is an intent
        # still unsettled past its cycle a failure (a crash or a fault may rightly leave one for later).
        self.clean_run = outcome == "ok" and not fired and not api
        skew = f"host{'+' if self.host_skew > 0 else '-' if self.host_skew < 0 else '0'}"
        skew += f"/api{'+' if self.api_offset > 0 else '-' if self.api_offset < 0 else '0'}"
        combo = "|".join([command, *sorted(set(fired)), *api, skew])
        if count:  # the completion runs meet no fault: they are not combinations
            self.w.combos[combo] += 1
            if currently_in_test_context():  # not in a replayed regression example
                event(combo)
        self.log.append(f"{command} crash={crash} db_kill={db_kill} -> {outcome} [{combo}]")
        return outcome

    def _rules_left(self) -> Counter[tuple[str, str]]:
        left: Counter[tuple[str, str]] = Counter()
        for r in self.w.control.faults()["rules"]:
            left[(r["endpoint"], r["action"])] += r["remaining"] or 0
        return left

    # --- rules ------------------------------------------------------------------------------------------
    @rule(batch=st.lists(rows, min_size=1, max_size=4), again=st.lists(st.integers(0, 999), max_size=2))
    def enqueue(self, batch: list[tuple[str, str, str, str]], again: list[int] = ()) -> None:  # type: ignore[assignment]
        """New rows, and `again`: new versions of documents enqueued before (duplicates of a key)."""
        for _kind, key, body, task in batch:
            self._insert(key, body, task)
        for i in again:
            if self.keys:
                self._insert(
                    self.keys[i % len(self.keys)], f"version {len(self.log)} of a known document", "default"
                )

    def _insert(self, key: str, body: str, task: str) -> None:
        try:
            with self.w.engine.begin() as conn:
                older = conn.execute(
                    text("SELECT id FROM etl_queue WHERE doc_key = :k AND task = :t AND status = 'queued'"),
                    {"k": key, "t": task},
                ).scalars()
                superseded = {f"q{i}" for i in older}
                conn.execute(
                    text("INSERT INTO etl_queue (doc_key, body, task) VALUES (:k, :b, :t)"),
                    {"k": key, "b": body, "t": task},
                )
        except Exception as exc:  # the user's own INSERT refused (PostgreSQL and NUL): nothing entered
            self.log.append(f"insert refused: {type(exc).__name__}")
            return
        self.never_bill |= superseded
        self.keys.append(key)
        self.log.append(f"enqueue {task} key[{len(key)}]={key[:20]!r} body={body[:20]!r}")

    @initialize(batch=st.lists(rows, min_size=2, max_size=8), sent=st.booleans())
    def documents_arrive(self, batch: list[tuple[str, str, str, str]], sent: bool = False) -> None:
        """Every example starts with work in the queue, so its faults meet a pipeline that is busy; with
        `sent`, a first fault-free submit has sent it (a batch is in flight from the first step)."""
        self.enqueue(batch)
        if sent:
            self.execute("submit", count=False)

    @rule(crash=crashes, db_kill=db_kills, fault=run_faults["submit"], times=st.integers(1, 2))
    def submit(
        self,
        crash: Any = None,
        db_kill: int | None = None,
        fault: dict[str, Any] | None = None,
        times: int = 1,
    ) -> None:
        self.arm(fault, times)
        self.execute("submit", crash, db_kill)

    @rule(crash=crashes, db_kill=db_kills, fault=run_faults["collect"], times=st.integers(1, 2), wait=waits)
    def collect(
        self,
        crash: Any = None,
        db_kill: int | None = None,
        fault: dict[str, Any] | None = None,
        times: int = 1,
        wait: int = 0,
    ) -> None:
        self.wait(wait)
        self.arm(fault, times)
        self.execute("collect", crash, db_kill)

    @rule(crash=crashes, db_kill=db_kills, fault=run_faults["reconcile"], times=st.integers(1, 2), wait=waits)
    def reconcile(
        self,
        crash: Any = None,
        db_kill: int | None = None,
        fault: dict[str, Any] | None = None,
        times: int = 1,
        wait: int = 0,
    ) -> None:
        self.wait(wait)
        self.arm(fault, times)
        self.execute("reconcile", crash, db_kill)

    def wait(self, seconds: int) -> None:
        """Time passes before the run (a morning job runs once batches have ended): its results and
        retrieve faults then meet ended batches, not only the list call."""
        if seconds and self.advanced + seconds <= MAX_ADVANCE:
            self._advance(seconds)
            self.log.append(f"advance {seconds}")

    def arm(self, fault: dict[str, Any] | None, times: int) -> None:
        """An API fault for the next `times` matching calls: this run's, or a later run's if this one
        makes no such call (a fault left armed is how a later run's reconciler meets it)."""
        if fault is not None:
            if fault.get("action") == "extra_line":
                self.w.actors[f"extra-line{fault['custom_id']}"] += 1
                fault = {**fault, "custom_id": self._extra_id(fault["custom_id"])}
            self.w.control.set_faults(rules=[{**fault, "times": times}], mode="append")
            self.log.append(f"fault {fault} x{times}")

    def _extra_id(self, which: str) -> str:
        if which == "@stranger":
            return "someone-elses-7"
        engine = self.w.engine if which == "@ours" else self.w.other_engine
        assert engine is not None
        with engine.begin() as conn:
            return custom_id(1, state.installation_id(conn, self.host_now()), 1)

    # --- the other actors on the same account and the same host ----------------------------------------
    @rule(n=st.integers(1, 4), ambiguous=st.booleans(), collect=st.booleans())
    def other_installation_sends(self, n: int, ambiguous: bool, collect: bool) -> None:
        """A second installation on the same API account sends documents of its own, whose row ids look
        like ours (its rows are numbered from 1 too); its create ambiguous when drawn."""
        assert self.w.other_engine is not None
        with self.w.other_engine.begin() as conn:
            for _ in range(n):
                self.other_docs += 1
                conn.execute(
                    text("INSERT INTO etl_queue (doc_key, body, task) VALUES (:k, :b, 'default')"),
                    {"k": f"k{self.other_docs}", "b": f"the other installation's document {self.other_docs}"},
                )
        if ambiguous:
            fault = {"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}
            self.w.control.set_faults(rules=[fault], mode="append")
        self.other_run("submit")
        if collect:
            self.other_run("collect")
        self.log.append(f"other installation: {n} document(s), ambiguous={ambiguous}, collect={collect}")
        self.w.actors["other-installation" + ("-ambiguous" if ambiguous else "")] += 1

    def other_run(self, command: str) -> None:
        from etl import pipeline

        try:
            with self._runtime(None, None, [], url=self.w.other_url) as rt:
                {"submit": pipeline.submit, "collect": pipeline.collect}[command](
                    rt.config, rt.db, rt.api, rt.me, rt.clock, rt.should_stop
                )
        except EtlError:  # a fault of ours still armed met it: the account is shared
            pass

    @rule()
    def twin_claims(self) -> None:
        """A live process of the same hostname whose pid our /proc cannot vouch for (another PID namespace,
        a cloned VM: its name says pid = ours, start time 1) holds its proof of life and claims rows."""
        if self.twin is not None:
            return
        from etl.store import batches as intents
        from etl.store import queue as q

        host, _pid, _token, boot, _start, ns, machine = liveness.new_owner().split(":")
        token = os.urandom(8).hex()
        name = f"{host}:{os.getpid()}:{token}:{boot}:1:{ns}:{machine}"
        twin = Twin(name)
        if self.w.db == "postgresql":
            twin.owner = liveness.with_lock(name)
            twin.conn = self.w.engine.connect()
            assert state.hold_owner_lock(twin.conn, twin.owner)
            twin.conn.commit()
        else:
            twin.owner = liveness.with_flock(name)
            folder = Path(self.w.url.removeprefix("sqlite:///") + life.OWNERS_SUFFIX)
            folder.mkdir(exist_ok=True)
            twin.fd = os.open(folder / f"{token}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(twin.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        now = self.host_now()
        twin.lease_until = now + timedelta(seconds=SUBMIT["claim_lease_seconds"])
        with self.w.engine.begin() as conn:
            twin.intent = intents.create_intent(
                conn, twin.owner, twin.lease_until, now, state.installation_id(conn, now)
            )
            claimed = q.claim(conn, twin.intent, SUBMIT["max_requests_per_batch"], now)
        self.twin = twin
        self.log.append(f"twin claims {claimed} row(s) as intent {twin.intent}")
        self.w.actors["twin-claims" if claimed else "twin-claims-nothing"] += 1

    @rule()
    def twin_dies(self) -> None:
        if self.twin is not None:
            self.twin.die()
            self.twin = None
            self.log.append("twin dies")

    def check_twin(self) -> None:
        """A live twin's claim is never taken from it while its lease runs, whatever /proc says; unless its
        proof of life is gone (PostgreSQL: a connection kill ended its lock session): /proc cannot vouch
        for it, so it looks dead and its claim may rightly go back (docs/survival.md, the limits)."""
        if self.twin is None or self.twin.lock_lost or self.host_now() >= self.twin.lease_until:
            return
        with self.w.engine.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM etl_batches WHERE id = :i"), {"i": self.twin.intent}
            ).scalar_one()
        assert status == "claimed", f"a live twin's claim became {status}\n" + "\n".join(self.log[-12:])

    def check_answers(self, engine: Engine) -> None:
        """No warehouse row holds an answer to another document (another installation's above all): each
        is the emulator's answer to the document of the row it landed in."""
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT q.id, q.doc_key, q.task, q.body, q.metadata, r.output_text FROM etl_results r "
                    "JOIN etl_queue q ON q.id = r.queue_id"
                )
            ).all()
        for r in rows:
            if engine is self.w.engine and r.id in self.odd_rows:
                continue  # its line was generated (odd_results): any text, checked by "done or dead"
            params = build_params(Row(r.id, r.doc_key, r.task, r.body, r.metadata), self.cfg.tasks, 10**7)
            assert r.output_text == reply_text(params), (
                f"warehouse row of {r.doc_key!r} holds another document's answer: {r.output_text!r}\n"
                + "\n".join(self.log[-12:])
            )

    @rule(seconds=st.sampled_from(STEPS))
    def time_passes(self, seconds: int) -> None:
        """Both clocks move forward together (batches end, leases and grace periods run out)."""
        if self.advanced + seconds <= MAX_ADVANCE:
            self._advance(seconds)
            self.log.append(f"advance {seconds}")

    @rule(side=st.sampled_from(["host", "api"]), delta=signed_steps)
    def clock_steps(self, side: str, delta: int) -> None:
        """One clock jumps, forward or back: the host's (`Harness.clock`) or the API's (its timestamps
        and `Date` header; its batches still live on true time)."""
        if side == "host":
            self.host_jumped = True
            self.host_skew += delta
            self.max_host_skew = max(self.max_host_skew, self.host_skew)
        else:
            self.api_offset += delta
            self.w.control.set_faults(mode="append", clock_offset_seconds=self.api_offset)
        self.log.append(f"{side} clock {delta:+d} (host {self.host_skew:+.0f}, api {self.api_offset:+.0f})")

    # --- issue 21: odd results lines and a full disk ---------------------------------------------------------
    @rule(
        lines=st.lists(RESULT_LINES, min_size=1, max_size=2), picks=st.lists(st.integers(0, 999), min_size=2)
    )
    def odd_results(self, lines: list[str], picks: list[int]) -> None:
        """The API breaks its promise for a few rows that may yet be sent: their results line is any
        generated line (tests/reliability/lines.py), fixed when their batch ends. Each such row must end
        `done` or `dead` with a reason (or back in the queue with one), and its batch must be collected."""
        with self.w.engine.begin() as conn:
            ours = state.installation_id(conn, self.host_now())
            status = dict(
                conn.execute(
                    text(
                        "SELECT id, status FROM etl_queue WHERE status IN ('queued', 'claimed', 'submitted')"
                    )
                ).all()
            )
        ids = sorted(status)
        if not ids:
            return
        chosen = {ids[p % len(ids)]: line for p, line in zip(picks, lines, strict=False)}
        # Our ids only (`q<row>_<intent>_<installation>`, or the legacy `q<row>`): the other installation's
        # rows are numbered from 1 too, and its batches are none of this row's.
        rules = {qid: re.escape(custom_id(qid)) + f"(_[0-9]+_{re.escape(ours)})?" for qid in chosen}
        self.w.control.set_faults(
            outcomes=[
                {"custom_id": rules[qid], "outcome": "raw", "line": line} for qid, line in chosen.items()
            ],
            mode="append",
        )
        # A row still queued is sent in a batch made from now on, whose end serves its line: if it is
        # collected, its rule must have fired (`check_odd_lines_served`). A claimed or submitted row's
        # batch may have ended already (or been made by an ambiguous create): it may never meet the rule.
        self.odd_due.update({qid: rules[qid] for qid in chosen if status[qid] == "queued"})
        self.odd_rows |= set(chosen)
        self.log.append(f"odd results for {sorted(chosen)}")

    @rule(command=st.sampled_from(COMMANDS), first=st.integers(1, 30), wait=waits)
    def disk_full(self, command: str, first: int, wait: int = 0) -> None:
        """The disk fills during a run: from its `first`-th SQL statement on, every write fails with the
        driver's own disk-full error. The run ends named (exit 74) or finishes before its next write; the
        invariants then hold as after any crash, and the next run (space freed) carries on."""
        self.wait(wait)
        self.execute(command, disk_full=first)

    # --- the judge ----------------------------------------------------------------------------------------
    def verdict(self, *, final: bool) -> checker.Verdict:
        ledger = self.w.control.ledger()
        self.check_superseded(ledger)
        self.check_answers(self.w.engine)
        self.check_twin()
        snap = checker.snapshot(self.w.engine, self.w.engine, ledger)
        return checker.check(
            snap,
            scenario=f"stateful[{self.w.db}]",
            max_attempts=SUBMIT["max_attempts"],
            now=self.host_now(),
            # Between steps, only where the host's clock has never jumped: a jump ages an intent on our clock
            # while its look-alike, on the API's true time, may not even have ended (it is then rightly
            # waited for). The final judgement, after the completion, has no such exemption.
            reconcile_cycle=CYCLE
            if final or (self.clean_run and not self.host_jumped)
            else timedelta(days=3650),
            final=final,
            fault=(True, ""),
            in_flight=not final,
        )

    @invariant()
    def nothing_lost_or_paid_twice(self) -> None:
        v = self.verdict(final=False)
        self.clean_run = False
        assert v.ok, " | ".join(v.failures()) + "\n" + "\n".join(self.log[-12:])

    def check_superseded(self, ledger: dict[str, Any]) -> None:
        """Only the newest queued row of a (doc_key, task) is ever sent: an older one still queued when a
        newer one arrived is never billed."""
        with self.w.engine.connect() as conn:
            ours = state.get_value(conn, state.INSTALLATION_KEY)
        billed = set(by_row(ledger, ours or "-")) & self.never_bill  # "-": none of ours sent yet
        assert not billed, f"superseded rows billed: {sorted(billed)[:5]}\n" + "\n".join(self.log[-12:])

    def complete(self) -> None:
        """Lift the API faults (the clocks stay as they are) and resume, as an operator would; then nights
        and mornings until everything is settled. The odd results lines stay: they are the API's answer
        for their rows, served whenever their batch ends, and most rows are only sent now."""
        odd = self.w.control.faults()["outcomes"]
        self.odd_hits = Counter()
        for o in odd:
            self.odd_hits[o["custom_id"]] += o["hits"]
        kept = [{k: v for k, v in o.items() if k in ("custom_id", "outcome", "line")} for o in odd]
        self.w.control.set_faults(outcomes=kept, clock_offset_seconds=self.api_offset)
        self.twin_dies()
        with self.w.engine.begin() as conn:
            state.resume(conn)
        step = CYCLE.total_seconds() + 60
        self._advance(step + max(0.0, self.max_host_skew - self.host_skew))
        for _ in range(4):
            if self.settled():
                return
            self.execute("submit", count=False)
            if self.other_docs:
                self.other_run("submit")
            self._advance(PROCESSING_SECONDS + 60)
            self.execute("collect", count=False)
            if self.other_docs:
                self.other_run("collect")
            self._advance(step)

    def check_odd_lines_served(self) -> None:
        """An odd line meant to be served was served: a row queued when its line was set and collected
        since met its rule (counted by the emulator), or the rule matches none of the ids we send."""
        if not self.odd_due:
            return
        hits = Counter(self.odd_hits)
        for o in self.w.control.faults()["outcomes"]:  # odd_results installs every outcome rule
            hits[o["custom_id"]] += o["hits"]
        self.w.actors["odd-rows-due"] += len(self.odd_due)
        self.w.actors["odd-line-served"] += sum(hits.values())
        with self.w.engine.connect() as conn:
            done = [
                int(r[0])
                for r in conn.execute(text("SELECT id FROM etl_queue WHERE status = 'done'"))
                if int(r[0]) in self.odd_due
            ]
        missed = [qid for qid in done if not hits[self.odd_due[qid]]]
        assert not missed, (
            f"rows {missed} were collected but their odd line's rule never fired: it matches no id we send\n"
            + "\n".join(self.log[-12:])
        )

    def settled(self) -> bool:
        with self.w.engine.connect() as conn:
            busy = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM etl_queue WHERE status IN ('queued', 'claimed', 'submitted'))"
                    " + (SELECT count(*) FROM etl_batches WHERE status IN"
                    " ('claimed', 'sending', 'unknown', 'submitted', 'ended'))"
                )
            ).scalar_one()
        return not busy

    def teardown(self) -> None:
        try:
            self.complete()
            self.check_odd_lines_served()
            if self.w.other_engine is not None:
                self.check_answers(self.w.other_engine)
            v = self.verdict(final=True)
            assert v.ok, (
                "after the completion run: " + " | ".join(v.failures()) + "\n" + "\n".join(self.log[-20:])
            )
        finally:
            failpoints.configure({})


WRITES = ("INSERT", "UPDATE", "DELETE", "BEGIN IMMEDIATE", "CREATE", "COPY")


def _writes(statement: str) -> bool:
    return statement.lstrip()[:15].upper().startswith(WRITES)


def _disk_full_error(db: str) -> Exception:
    """The driver's own exception for a full disk, as it raises it."""
    if db == "sqlite":
        return sqlite3.OperationalError("database or disk is full")
    return psycopg.errors.DiskFull("could not extend file: No space left on device")


def machine_for(world: World) -> type[FaultModel]:
    return type(f"FaultModel_{world.db}", (FaultModel,), {"world": world})


def replay(world: World, steps: list[tuple[str, Any]]) -> FaultModel:
    """Run a named step sequence (a regression example) deterministically, judging after each step and
    completing at the end, exactly as the generated examples are judged."""
    m = machine_for(world)()
    try:
        m.nothing_lost_or_paid_twice()
        for name, args in steps:
            getattr(m, name)(**args)
            m.nothing_lost_or_paid_twice()
    finally:
        m.teardown()
    return m


def examples_per_db() -> int:
    return int(os.environ.get("ETL_STATEFUL_EXAMPLES", "200"))


Factory = Callable[..., World]
