"""What a chunk of results does to the warehouse and the queue: planned line by line, written at once.

`Chunk.add` turns one result line into its outcome (a warehouse row, a re-queue with a reason, a dead
row) as the line is read, so the collector never holds more than the compact plan of a chunk. `write`
then applies the plan: one warehouse write, and the queue rows' guarded updates
(`status = 'submitted' AND batch_ref = :intent`) with the chunk's events, which is what makes a re-run
or a second collector harmless.

Where the queue lives in SQLite, a batch's queue rows are settled once, after its last chunk (see
`settles_per_batch`); until then its chunks' results are committed on their own, as with a separate
warehouse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection

from etl import failpoints
from etl.answer import Unreadable, checked_answer, no_text_reason, parsed_json, result_row
from etl.answer import kind_of as _kind
from etl.answer import object_in as _object
from etl.config import Config
from etl.errors import clean, describe
from etl.pricing import Meter
from etl.remote import RemoteBatch
from etl.store import events, state, warehouse
from etl.store import queue as q
from etl.store.batches import Intent
from etl.store.databases import Databases
from etl.store.schema import DocStatus, MoneyUnits

log = structlog.get_logger("etl.collect")

PERMANENT_ERRORS = {"invalid_request_error", "not_found_error"}
SYSTEMIC_ERRORS = {"billing_error", "authentication_error", "permission_error"}


@dataclass(slots=True)
class Expected:
    """A row the batch sent, as the collector tracks it while results arrive."""

    doc_key: str
    task: str
    attempts: int
    status: str
    enqueued_at: datetime | None = None


@dataclass
class Totals:
    succeeded: int = 0
    requeued: int = 0
    dead: int = 0


def category(reason: str) -> str:
    """A row's reason as the report counts it: the whole reason (`events.reason_key`), not what comes
    before its first colon ("errored" said nothing of why)."""
    if reason.startswith("gave up after"):
        return f"max attempts reached (last: {events.reason_key(reason.partition('last: ')[2])})"
    return events.reason_key(reason)


@dataclass
class Chunk:
    """The plan for up to `collect.chunk_size` results of one batch."""

    intent: Intent
    remote: RemoteBatch
    config: Config
    encoder: warehouse.Encoder
    meter: Meter
    collected_at: datetime  # when the chunk was begun: the time its results were read
    unique_keys: bool = False  # the batch sent each (doc_key, task) once (see warehouse.Encoded)
    results: warehouse.Encoded = field(init=False)  # the warehouse rows, encoded as they arrive
    done: list[int] = field(default_factory=list)
    counted: list[tuple[int, str]] = field(default_factory=list)  # re-queued, attempt counted
    free: list[tuple[int, str]] = field(default_factory=list)  # re-queued, attempt not counted
    dead: list[tuple[int, str]] = field(default_factory=list)
    tally: events.Tally = field(default_factory=events.Tally)
    notes: dict[int, str] = field(default_factory=dict)  # done rows with a reason (an answer without text)
    systemic: str | None = None
    size: int = 0
    # per task: documents, input, output, cache write, cache read tokens, cost, standard cost
    _sums: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.results = warehouse.Encoded(self.encoder.dialect, unique_keys=self.unique_keys)
        self._json_tasks = {
            name for name, task in self.config.tasks.items() if task.output_schema is not None
        }

    def add(self, qid: int, exp: Expected, result: Any) -> None:
        """Plan one row's outcome from its result. Whatever the result holds, the row gets an outcome: a
        result that cannot be read ends the row `dead` with the reason, and the rest of the chunk goes on."""
        self.size += 1
        try:
            self._add(qid, exp, result)
        except Unreadable as exc:
            self._unreadable(qid, exp, str(exc))
        except Exception as exc:  # recovery loop: any exception a row's content raises ends that row
            self._unreadable(qid, exp, f"unreadable result: {describe(exc)}")

    def _unreadable(self, qid: int, exp: Expected, reason: str) -> None:
        self.dead.append((qid, clean(reason)))
        self.tally.add("dead", exp.task, "unreadable result")
        log.error("result_unreadable", queue_id=qid, doc_key=exp.doc_key[:200], reason=clean(reason, 200))

    def _add(self, qid: int, exp: Expected, result: Any) -> None:
        if not isinstance(result, dict):
            raise Unreadable(f"unreadable result: `result` is {_kind(result)}, not an object")
        kind = result.get("type")
        if kind == "succeeded":
            self._succeeded(qid, exp, _object(result, "message"))
        elif kind == "errored":
            err = _object(result, "error", optional=True).get("error")
            err = err if isinstance(err, dict) else {}
            etype = clean(str(err.get("type") or "api_error"), 100)
            reason = clean(f"{etype}: {err.get('message') or ''}".strip())
            if etype in PERMANENT_ERRORS:
                self.dead.append((qid, reason))
                self.tally.add("dead", exp.task, category(reason))
            elif etype in SYSTEMIC_ERRORS:
                self.free.append((qid, reason))
                self.tally.add("requeued", exp.task, category(reason) + " (attempt not counted)")
                self.systemic = self.systemic or reason
            else:
                self._failure(qid, exp, reason)
        elif kind == "canceled":
            # Canceled (by `etl cancel` or an orphan cancel) before the model saw it: nothing was billed and
            # nothing was wrong with the document, so it goes back to the queue without using an attempt.
            reason = "canceled before the model processed it"
            self.free.append((qid, reason))
            self.tally.add("requeued", exp.task, reason + " (attempt not counted)")
        elif kind == "expired":
            self._failure(qid, exp, f"{kind} before the model processed it")
        else:
            self._failure(qid, exp, clean(f"unknown result type {kind!r}", 200))

    def _failure(self, qid: int, exp: Expected, reason: str) -> None:
        """A transient failure: re-queued with the attempt counted, or dead once attempts run out."""
        if exp.attempts + 1 >= self.config.submit.max_attempts:
            reason = f"gave up after {exp.attempts + 1} attempts; last: {reason}"
            self.dead.append((qid, reason))
            self.tally.add("dead", exp.task, category(reason))
        else:
            self.counted.append((qid, reason))
            self.tally.add("requeued", exp.task, category(reason))

    def _succeeded(self, qid: int, exp: Expected, message: dict[str, Any]) -> None:
        answer = checked_answer(message, self.encoder.caps)
        text, usage, model, _ = answer
        output_json = parsed_json(text) if exp.task in self._json_tasks else None
        cost, standard = self.meter.money(model, usage)
        row = self.encoder.encode_values(
            result_row(
                doc_key=exp.doc_key,
                task=exp.task,
                queue_id=qid,
                answer=answer,
                output_json=output_json,
                cost=cost,
                standard=standard,
                source_id=self.intent.batch_id,
                enqueued_at=exp.enqueued_at,
                ended_at=self.remote.ended_at,
                collected_at=self.collected_at,
                mode="batch",
            )
        )
        self.results.rows.append(row)
        if not text:
            self.notes[qid] = no_text_reason(message)
        self.done.append(qid)
        sums = self._sums.get(exp.task)
        if sums is None:
            sums = self._sums[exp.task] = [0, 0, 0, 0, 0, 0, 0]  # money in MONEY_UNIT: integers
        sums[0] += 1
        sums[1] += usage.input_tokens
        sums[2] += usage.output_tokens
        sums[3] += usage.cache_write
        sums[4] += usage.cache_read
        sums[5] += cost
        sums[6] += standard

    def refuse(self, refused: list[tuple[int, str]], expected: dict[int, Expected]) -> None:
        """Results the warehouse would not store (the database's reason given): their rows end `dead`
        with that reason instead of `done`, and the batch's other rows are settled as planned."""
        if not refused:
            return
        gone = {qid for qid, _ in refused}
        self.done = [qid for qid in self.done if qid not in gone]
        for qid, why in refused:
            exp = expected[qid]
            reason = f"warehouse refused the result: {why}"
            self.dead.append((qid, reason))
            self.tally.add("dead", exp.task, "warehouse refused the result")
            sums = self._sums.get(exp.task)
            if sums is not None:
                sums[0] -= 1
            log.error("result_refused_by_warehouse", queue_id=qid, doc_key=exp.doc_key[:200], reason=why)

    def absorb(self, other: Chunk) -> None:
        """Take over the queue transitions and counts of `other`, whose results are written."""
        self.size += other.size
        self.done += other.done
        self.notes.update(other.notes)
        self.counted += other.counted
        self.free += other.free
        self.dead += other.dead
        self.tally.absorb(other.events())
        self.systemic = self.systemic or other.systemic

    def events(self) -> events.Tally:
        """The chunk's outcome counts, as the event rows it adds."""
        for task, (docs, inp, out, write, read, cost, standard) in self._sums.items():
            self.tally.add(
                "succeeded",
                task,
                None,
                int(docs),
                input_tokens=inp,
                output_tokens=out,
                cache_write_tokens=write,
                cache_read_tokens=read,
                cost_usd=MoneyUnits(cost).usd(),
                standard_cost_usd=MoneyUnits(standard).usd(),
            )
        self._sums.clear()
        return self.tally


def settles_per_batch(db: Databases) -> bool:
    """Whether a batch's queue rows are settled once, after its last chunk, rather than with each chunk.

    On SQLite, yes. Results arrive in random order, so each chunk's rows are spread over the whole batch,
    and a queue row holds its ~1 KB body: with 20,000-result chunks, each chunk's UPDATE rewrote about
    19,000 of a 100,000-row batch's 35,000 pages, 95,000 page writes per batch against 35,000 for one
    UPDATE at the end (bench/RESULTS.md). On PostgreSQL the server applies each chunk's UPDATE beside the
    collector's own work; one UPDATE at the end would run alone.
    """
    return not db.capabilities.server


def write(
    db: Databases,
    now: datetime,
    conn: Connection,
    chunk: Chunk,
    expected: dict[int, Expected],
    totals: Totals,
    *,
    settle: bool = True,
) -> None:
    """Apply one chunk: the warehouse rows, then the queue rows' new states and the chunk's events, in one
    transaction on `conn` (a connection to `db.main` with no transaction open; `now` is when the chunk is applied).

    With a separate warehouse the results are committed there first: a crash in between leaves rows
    `submitted`, and the next collect writes the same results again (the upsert is idempotent).

    With `settle=False` only the results are written (and committed, in the same database too) and the
    chunk keeps its queue transitions, for a later `write` of a chunk that absorbed it. Its queue rows
    stay `submitted` until then, with the same guarantee as above.
    """
    if chunk.size == 0:
        return
    if not db.same and chunk.results.rows:
        with db.warehouse.begin() as wconn:
            chunk.refuse(warehouse.write_isolating(wconn, chunk.results), expected)
        failpoints.hit("collect.after_warehouse")
    if not settle:
        if db.same and chunk.results.rows:
            with conn.begin():
                chunk.refuse(warehouse.write_isolating(conn, chunk.results), expected)
            failpoints.hit("collect.after_warehouse")
        chunk.results.rows.clear()  # written: only the queue transitions are kept
        return
    with conn.begin():
        if db.same and chunk.results.rows:
            chunk.refuse(warehouse.write_isolating(conn, chunk.results), expected)
        _settle_rows(conn, chunk, expected, now)
    if db.same and chunk.results.rows:
        failpoints.hit("collect.after_warehouse")
    if chunk.counted or chunk.free:
        failpoints.hit("requeue.after_requeue")
    _count_settled(chunk, expected, totals)
    if chunk.systemic:
        log.error("submission_paused", reason=chunk.systemic)


def _settle_rows(conn: Connection, chunk: Chunk, expected: dict[int, Expected], now: datetime) -> None:
    """The chunk's queue transitions and events, inside the caller's transaction."""
    batch_ref = chunk.intent.id
    noted = [(qid, chunk.notes[qid]) for qid in chunk.done if qid in chunk.notes]
    q.mark_done(conn, batch_ref, [qid for qid in chunk.done if qid not in chunk.notes], now)
    q.mark_done_noted(conn, batch_ref, noted, now)
    for qid, note in noted:
        chunk.tally.add("noted", expected[qid].task, note[:120])  # what it held: a few block types
    q.requeue(conn, batch_ref, chunk.counted, now, count_attempt=True)
    q.requeue(conn, batch_ref, chunk.free, now, count_attempt=False)
    q.kill(conn, batch_ref, chunk.dead, now)
    chunk.events().flush(conn, now, batch_ref)
    if chunk.systemic:
        state.pause(conn, f"results carry {chunk.systemic}", now)


def _count_settled(chunk: Chunk, expected: dict[int, Expected], totals: Totals) -> None:
    """Pure: the settled rows' new states in `expected` (what the stream's later passes compare), counted."""
    for qid in chunk.done:
        expected[qid].status = DocStatus.DONE
    for qid, _ in chunk.counted + chunk.free:
        expected[qid].status = DocStatus.QUEUED
    for qid, _ in chunk.dead:
        expected[qid].status = DocStatus.DEAD
    totals.succeeded += len(chunk.done)
    totals.requeued += len(chunk.counted) + len(chunk.free)
    totals.dead += len(chunk.dead)
