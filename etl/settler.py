"""The live path's writer: answers to the warehouse, rows `done`, events, on one thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog

from etl.errors import describe, environmental
from etl.pricing import Usage
from etl.spend import Spend
from etl.store import events, warehouse
from etl.store import live as store
from etl.store.databases import Databases

log = structlog.get_logger("etl.live")

Dead = Callable[[int, str, str], None]  # (queue id, task, reason)


@dataclass(frozen=True)
class Answer:
    result: dict[str, Any]  # the etl_results row
    task: str
    usage: Usage
    standard: Decimal
    batch_cost: Decimal


@dataclass
class LiveOutcome:
    succeeded: int = 0
    dead: int = 0
    rejected: int = 0
    fell_back: int = 0
    given_back: int = 0
    recovered: int = 0
    possibly_billed_twice: int = 0
    calls: int = 0
    reasons: list[str] = field(default_factory=list)


class Settler:
    """Writes answers on one thread, as many as have arrived in one transaction: results, rows `done`,
    events. A commit per answer (an fsync each on SQLite, one round trip more each on PostgreSQL) was
    the worker's bottleneck at 16 calls in flight (bench/RESULTS.md). An answer not yet committed when
    the process dies is an in-flight call like any other: called again, counted as possibly billed twice.
    """

    def __init__(
        self, db: Databases, clock: Callable[[], datetime], spend: Spend, outcome: LiveOutcome, dead: Dead
    ) -> None:
        self.db, self.clock = db, clock
        self.spend = spend
        self.outcome = outcome
        self.dead = dead  # ends a row `dead` with a reason, as the worker does
        self._queue: queue.SimpleQueue[Answer | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="etl-live-settle", daemon=True)
        self._thread.start()

    def put(self, answer: Answer) -> None:
        self._queue.put(answer)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                group.append(item)
            self._settle(group)

    def _settle(self, group: list[Answer]) -> None:
        """Write a group; if it fails, each answer alone, so one answer the database refuses ends its own
        row `dead` (with the database's reason) instead of leaving the group to be called and paid again.
        A failure of the machine (disk full...) leaves the rows `calling`: they are recovered later."""
        try:
            self._write(group)
            return
        except Exception as exc:  # recovery loop: the rows stay `calling` and are recovered
            if len(group) == 1:
                self._refused(group[0], exc)
                return
            if environmental(exc) is not None:
                log.error("live_settle_failed", documents=len(group), error=describe(exc))
                return
        for answer in group:
            try:
                self._write([answer])
            except Exception as exc:  # recovery loop: this answer's row only
                self._refused(answer, exc)

    def _refused(self, answer: Answer, exc: Exception) -> None:
        if environmental(exc) is not None:
            log.error("live_settle_failed", documents=1, error=describe(exc))
            return
        reason = f"the database refused the answer: {describe(exc)}"
        try:
            self.dead(answer.result["queue_id"], answer.task, reason)
        except Exception as again:  # recovery loop: the row stays `calling` and is recovered
            log.error("live_settle_failed", documents=1, error=describe(again))

    def _write(self, group: list[Answer]) -> None:
        db = self.db
        now = self.clock()
        tally = events.Tally()
        results = [a.result for a in group]
        if not db.same:
            with db.warehouse.begin() as wconn:
                warehouse.upsert_few(wconn, results)
        with db.main.begin() as conn:
            if db.same:
                warehouse.upsert_few(conn, results)
            settled = []
            for a in group:
                if store.done(conn, a.result["queue_id"], now):
                    settled.append(a)
                    tally.add(
                        "live_succeeded",
                        a.task,
                        input_tokens=a.usage.input_tokens,
                        output_tokens=a.usage.output_tokens,
                        cache_write_tokens=a.usage.cache_write,
                        cache_read_tokens=a.usage.cache_read,
                        cost_usd=a.standard,
                        standard_cost_usd=a.standard,
                    )
                else:
                    log.warning(
                        "live_claim_lost", queue_id=a.result["queue_id"], note="taken over; result stored"
                    )
            tally.flush(conn, now, None)
        self.spend.settled(sum((a.standard for a in group), Decimal(0)))
        self.outcome.succeeded += len(settled)
        for a in settled:
            log.info(
                "live_document_done",
                queue_id=a.result["queue_id"],
                doc_key=a.result["doc_key"],
                cost_usd=round(a.standard, 6),
                batch_would_cost_usd=round(a.batch_cost, 6),
            )
