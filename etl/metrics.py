"""The Prometheus metrics page: served by `etl run` (config [metrics] listen) and printed by `etl metrics`.

Read from the database at each scrape (a custom collector), so several daemons on one PostgreSQL tell
one truth and `etl metrics` from cron shows the same page; plus this process's own counters
(etl/counters.py) and its process_* metrics when served. A scrape makes what `etl status` makes (its
verdict is `etl_health_ok`) and four grouped reads more: a few aggregate SELECTs on existing tables and
indexes whatever the size of the queue (bench/RESULTS.md, "Metrics scrape").

Money is in USD, as float64 because that is all a Prometheus sample holds: the exact Decimal sums are
converted once, at the scrape, to the nearest double (15-16 significant digits: exact to 10**-10 USD
below about one million dollars). Exact amounts are in `etl report --json`. Names follow the Prometheus
conventions: `_total` counters, `_seconds` for times and ages, `_timestamp_seconds` for Unix times,
`_usd` for money; label sets are bounded (status, task, job, path, event; never a document key).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from etl import __version__, budget, counters, paths, report
from etl import status as status_mod
from etl.clock import parse_iso
from etl.config import Config
from etl.errors import EtlError
from etl.settings import Settings
from etl.store import batches as intents
from etl.store import events, state
from etl.store import metrics as store
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import BatchStatus, DocStatus

log = structlog.get_logger("etl.metrics")

JOBS = ("submit", "collect")  # the daemon's scheduled jobs (etl.daemon.JOBS)
OUTCOMES = ("running", "ok", "partial", "failed", "paused", "interrupted", "crashed")
DUTY = 0.05  # the served page reads the database at most this share of the time (DatabaseCollector)
RESULTS_KEPT = timedelta(days=29)  # the API keeps a batch's results this long after its creation
EVENTS = (*report.KINDS, *sorted(paths.LIVE_KINDS))
PATH_OF = {"succeeded": "batch", "live_succeeded": "live"}  # the events that carry tokens and money
TOKEN_TYPES = ("input", "output", "cache_write", "cache_read")


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _seconds(at: datetime | None) -> float:
    return 0.0 if at is None else at.timestamp()


@dataclass(frozen=True)
class Reading:
    families: list[Metric]
    up: int
    seconds: float  # how long the read took
    at: float  # time.monotonic() when it ended


class DatabaseCollector(Collector):
    """Everything the database says, read at scrape time. A failed read yields `etl_database_up 0`.

    With `duty` (the served page: DUTY), a read is reused until it is `1/duty - 1` times its own duration
    old, so however often it is scraped the page spends at most that share of the time reading: a 2 s read
    is reused for 38 s at 5 %. The next read then runs in the background while scrapes get the last one
    at once (a 30 s read at 1M rows on SQLite would otherwise outlast Prometheus' scrape timeout).
    Prometheus' usual 60 s interval sees values at most one interval older than a read every scrape would,
    unless a read takes over 3 s (bench/RESULTS.md); `etl_metrics_age_seconds` says how old they are."""

    def __init__(
        self,
        settings: Settings,
        db: Databases,
        me: str,
        clock: Callable[[], datetime],
        *,
        duty: float | None = None,
    ) -> None:
        self.settings, self.db, self.me, self.clock = settings, db, me, clock
        self.duty = duty
        self._last: Reading | None = None
        self._refreshing = False
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        last = self._current()
        yield from last.families
        for name, doc, value in (
            ("etl_database_up", "1 when the database was read, 0 when it could not be.", last.up),
            (
                "etl_metrics_read_seconds",
                "How long the read of the database behind this page took.",
                last.seconds,
            ),
            (
                "etl_metrics_age_seconds",
                "How long ago the database was read for this page.",
                time.monotonic() - last.at,
            ),
        ):
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g

    def _current(self) -> Reading:
        """A fresh read without `duty`. With it: the last read, and a new one started in the background
        once it is old enough, so a scrape never waits for a slow read but the very first."""
        if self.duty is None:
            return self._fresh()
        with self._lock:
            last = self._last
            due = last is None or time.monotonic() - last.at >= last.seconds * (1 / self.duty - 1)
            start = due and not self._refreshing
            self._refreshing = self._refreshing or start
        if start and last is None:
            self._refresh()  # the first read: this scrape waits for it
        elif start:
            threading.Thread(target=self._refresh, name="etl-metrics-read", daemon=True).start()
        while last is None:  # the first read, made by this scrape or a concurrent one
            with self._lock:
                last = self._last
            if last is None:
                time.sleep(0.05)
        return last

    def _refresh(self) -> None:
        reading = self._fresh()
        with self._lock:
            self._last, self._refreshing = reading, False

    def _fresh(self) -> Reading:
        started = time.monotonic()
        try:
            families, up = list(self._read()), 1
        except (EtlError, SQLAlchemyError) as exc:
            log.warning("metrics_read_failed", error=str(exc).splitlines()[0])
            families, up = [], 0
        ended = time.monotonic()
        return Reading(families, up, ended - started, ended)

    def _read(self) -> Iterator[Metric]:
        cfg = self.settings.current  # one config for the whole page (the daemon's reload swaps it)
        info, healthy, problems = status_mod.status(cfg, self.db, self.me, self.clock())
        now = self.clock()
        with reading(self.db.main) as conn:
            pairs = store.queue_by_status_and_task(conn)
            per_status = store.batches_by_status(conn)
            succeeded_at = store.last_success(conn)
            latest = {job: state.latest_attempt(conn, job) for job in JOBS}
            totals = events.summary_since(conn, None)
            open_ = intents.open_intents(conn)
        oldest = parse_iso(info["oldest_queued_at"]) if info.get("oldest_queued_at") else None
        tasks = sorted(cfg.tasks)
        yield from _queue(pairs, tasks, oldest, now)
        yield from _batches(per_status, open_, now)
        yield from _jobs(latest, succeeded_at)
        yield from _events(totals, tasks)
        yield from _budget(info["budget"], tasks)
        yield from _health(info, healthy, problems)
        g = _gauge("etl_info", "Always 1: the version of etl serving this page.", ["version"])
        g.add_metric([__version__], 1)
        yield g


def _queue(
    pairs: list[tuple[str, str, int]], tasks: list[str], oldest: datetime | None, now: datetime
) -> Iterator[Metric]:
    rows: dict[tuple[str, str], int] = {(s.value, t): 0 for s in DocStatus for t in tasks}
    for status, task, n in pairs:
        rows[(status, task)] = n
    g = _gauge("etl_queue_rows", "Rows of etl_queue by status and task.", ["status", "task"])
    for (status, task), n in sorted(rows.items()):
        g.add_metric([status, task], n)
    yield g
    g = _gauge("etl_queue_oldest_queued_age_seconds", "Age of the oldest queued row (0 when none is queued).")
    g.add_metric([], 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()))
    yield g


def _batches(per_status: Mapping[str, int], open_: list[intents.Intent], now: datetime) -> Iterator[Metric]:
    g = _gauge("etl_batches", "Batch records (etl_batches) by status.", ["status"])
    for s in BatchStatus:
        g.add_metric([s.value], per_status.get(s.value, 0))
    yield g
    g = _gauge(
        "etl_intents_unknown",
        "Batch creates whose outcome is unknown (status unknown or sending): etl reconcile settles them.",
    )
    g.add_metric([], per_status.get(BatchStatus.UNKNOWN, 0) + per_status.get(BatchStatus.SENDING, 0))
    yield g
    expiries = [
        i.results_expire_at or (i.remote_created_at or i.created_at) + RESULTS_KEPT
        for i in open_
        if i.status in (BatchStatus.SUBMITTED, BatchStatus.ENDED)
    ]
    g = _gauge(
        "etl_batch_results_expiry_seconds",
        "Seconds until the results of the soonest-expiring uncollected batch are gone (created_at + 29 d); "
        "absent when no batch is open.",
    )
    if expiries:
        g.add_metric([], (min(expiries) - now).total_seconds())
    yield g


def _jobs(latest: Mapping[str, state.Run | None], succeeded_at: Mapping[str, datetime]) -> Iterator[Metric]:
    started = _gauge(
        "etl_job_last_run_timestamp_seconds", "When the newest run of each job started.", ["etl_job"]
    )
    outcome = _gauge(
        "etl_job_last_run_outcome",
        "1 for the outcome of each job's newest run, 0 for the others.",
        ["etl_job", "outcome"],
    )
    success = _gauge(
        "etl_job_last_success_timestamp_seconds", "When each job last ended with outcome ok.", ["etl_job"]
    )
    for job in JOBS:
        run = latest.get(job)
        if run is not None:
            started.add_metric([job], _seconds(run.started_at))
            for name in sorted({*OUTCOMES, run.outcome}):
                outcome.add_metric([job, name], 1 if name == run.outcome else 0)
        if job in succeeded_at:
            success.add_metric([job], _seconds(succeeded_at[job]))
    yield from (started, outcome, success)


def _events(totals: list[dict[str, Any]], tasks: list[str]) -> Iterator[Metric]:
    """Documents, tokens and money since the beginning, from the aggregated events (never deleted)."""
    docs: dict[tuple[str, str], int] = {(t, e): 0 for t in tasks for e in EVENTS}
    tokens: dict[tuple[str, str, str], int] = {
        (t, p, k): 0 for t in tasks for p in PATH_OF.values() for k in TOKEN_TYPES
    }
    cost: dict[tuple[str, str], list[Decimal]] = {
        (t, p): [Decimal(0), Decimal(0)] for t in tasks for p in PATH_OF.values()
    }
    for r in totals:
        task = r["task"] or ""
        docs[(task, r["kind"])] = docs.get((task, r["kind"]), 0) + r["documents"]
        path = PATH_OF.get(r["kind"])
        if path is None:
            continue
        for k in TOKEN_TYPES:
            tokens[(task, path, k)] = tokens.get((task, path, k), 0) + r[f"{k}_tokens"]
        money = cost.setdefault((task, path), [Decimal(0), Decimal(0)])
        money[0] += r["cost_usd"]
        money[1] += r["standard_cost_usd"]
    c = CounterMetricFamily(
        "etl_documents",
        "Documents per task and event (README: the morning report's columns).",
        labels=["task", "event"],
    )
    for (task, event), n in sorted(docs.items()):
        c.add_metric([task, event], n)
    yield c
    c = CounterMetricFamily(
        "etl_tokens", "Tokens billed per task, path and type.", labels=["task", "path", "type"]
    )
    for key, n in sorted(tokens.items()):
        c.add_metric(list(key), n)
    yield c
    charged = CounterMetricFamily("etl_cost_usd", "USD charged per task and path.", labels=["task", "path"])
    standard = CounterMetricFamily(
        "etl_standard_cost_usd",
        "USD the same tokens cost at standard (non-batch) prices.",
        labels=["task", "path"],
    )
    for (task, path), (paid, full) in sorted(cost.items()):
        charged.add_metric([task, path], float(paid))
        standard.add_metric([task, path], float(full))
    yield from (charged, standard)


def _budget(b: Mapping[str, Any], tasks: list[str]) -> Iterator[Metric]:
    """Tonight's budget (a night runs noon to noon in schedule.timezone); task `*` is the whole night's."""
    cap = _gauge("etl_budget_cap_usd", "The nightly cap in USD (absent: no cap).", ["task"])
    for task, value in b["caps_usd"].items():
        cap.add_metric([task], float(Decimal(value)))
    reserved = _gauge(
        "etl_budget_reserved_usd",
        "USD reserved under tonight's cap (upper bound of what was sent).",
        ["task"],
    )
    reserved.add_metric([budget.ALL], float(Decimal(b["reserved_usd"])))
    for task, value in b["reserved_by_task_usd"].items():
        reserved.add_metric([task], float(Decimal(value)))
    waiting = _gauge(
        "etl_budget_waiting_documents", "Queued documents held back tonight by the nightly cap.", ["task"]
    )
    for task, n in sorted({**dict.fromkeys(tasks, 0), **b["waiting_documents"]}.items()):
        waiting.add_metric([task], n)
    yield from (cap, reserved, waiting)


def _health(info: Mapping[str, Any], healthy: bool, problems: list[str]) -> Iterator[Metric]:
    g = _gauge("etl_health_ok", "1 when `etl status --check` would pass, 0 when it names a problem.")
    g.add_metric([], 1 if healthy else 0)
    yield g
    g = _gauge("etl_health_problems", "How many problems `etl status --check` names.")
    g.add_metric([], len(problems))
    yield g
    g = _gauge("etl_submission_paused", "1 while submission is paused (etl resume lifts it).")
    g.add_metric([], 1 if info["submission_paused"] else 0)
    yield g
    stranded = info.get("stranded_rows") or {}
    g = _gauge(
        "etl_stranded_rows",
        "Rows nothing will move on: 'submitted' with no open batch, 'claimed' with no live intent.",
        ["status"],
    )
    for s in (DocStatus.SUBMITTED, DocStatus.CLAIMED):
        g.add_metric([s.value], stranded.get(s, 0))
    yield g
    g = _gauge(
        "etl_unexplained_batches",
        "Batches of this installation that no intent explains: billed, never to be collected "
        "(etl reconcile --acknowledge BATCH_ID once dealt with).",
    )
    g.add_metric([], len(info.get("unexplained_batches") or {}))
    yield g


def registry(
    settings: Settings, db: Databases, me: str, clock: Callable[[], datetime], *, process: bool
) -> CollectorRegistry:
    """The page's collectors: the database's always; the process's counters and process_* when served."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DatabaseCollector(settings, db, me, clock, duty=DUTY if process else None))
    if process:
        for counter in counters.ALL:
            reg.register(counter)
        ProcessCollector(registry=reg)
    return reg


def page(cfg: Config, db: Databases, me: str, clock: Callable[[], datetime]) -> str:
    """`etl metrics`: the page once, in the text exposition format."""
    return generate_latest(registry(Settings(cfg), db, me, clock, process=False)).decode("utf-8")


class Server:
    """The page over HTTP in a daemon thread of prometheus_client; `stop` closes the socket."""

    def __init__(self, reg: CollectorRegistry, host: str, port: int) -> None:
        self.server, self.thread = start_http_server(port, host, registry=reg)
        self.host, self.port = host, int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(settings: Settings, db: Databases, me: str, clock: Callable[[], datetime]) -> Server | None:
    """Start serving on the configured address; None when off or when the address cannot be bound (the
    nightly work goes on: a monitoring that stops seeing the daemon says so with `up == 0`)."""
    cfg = settings.current  # where to listen is read at start only (a change needs a restart)
    address = cfg.metrics.address
    if address is None:
        return None
    host, port = address
    try:
        server = Server(registry(settings, db, me, clock, process=True), host, port)
    except OSError as exc:
        log.error("metrics_unavailable", listen=cfg.metrics.listen, error=str(exc))
        return None
    log.info("metrics_serving", url=f"http://{_bracketed(server.host)}:{server.port}/metrics")
    return server


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
