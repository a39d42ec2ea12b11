"""The morning job: find ended batches, stream their results in chunks into the warehouse, settle rows.

A batch is `collected` only when every custom_id it sent has been seen exactly once. Each chunk is
applied with guarded updates (`status = 'submitted' AND batch_ref = :intent`), so a retried stream, a
re-run after a crash, or a second collector never applies a result twice.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import structlog

from etl import codec, failpoints, settlement
from etl.api import Api
from etl.clock import never, utcnow
from etl.config import Config
from etl.errors import ProviderError, ResultsGone, clean, describe, environmental
from etl.memory import gc_paused
from etl.pricing import Meter
from etl.prompt import id_suffix, parse_custom_id, row_of
from etl.remote import RemoteBatch
from etl.settlement import Expected
from etl.store import batches as intents
from etl.store import events, schema, state
from etl.store import queue as q
from etl.store.batches import Intent
from etl.store.databases import Databases
from etl.store.dialect import capabilities
from etl.store.engine import bulk_writes, reading
from etl.store.schema import DocStatus
from etl.store.warehouse import Encoder

log = structlog.get_logger("etl.collect")

FIRST_CHUNK_MIN = 1000

ARCHIVED_REASON = (
    "results were archived (29 days after the batch was created) before they were collected; "
    "re-queued, and these documents will be paid for again"
)


@dataclass
class CollectOutcome:
    batches_checked: int = 0
    batches_collected: int = 0
    succeeded: int = 0
    requeued: int = 0
    dead: int = 0
    archived: int = 0
    problems: list[str] = field(default_factory=list)
    paused: str | None = None  # a wrong key, billing or spend limit paused submission: exit 75


def may_call_api(db: Databases) -> bool:
    """A batch is open (sent, not yet collected), or an intent may need the API's list (an unknown create,
    or a claim or send whose lease may have run out: reconciliation turns those into unknown creates).
    Without one a collect has nothing to ask the API, so it never loads the SDK."""
    with reading(db.main) as conn:
        return bool(intents.open_intents(conn)) or intents.may_need_the_list(conn)


def preload(db: Databases, api: Api) -> dict[int, dict[int, Expected]]:
    """While the SDK loads (`etl collect`, not the daemon): the sent rows of the first open batch, which a
    collect reads next anyway once that batch has ended. Empty when the SDK is already loaded."""
    if api.ready:
        return {}
    with reading(db.main) as conn:
        first = next(iter(intents.open_intents(conn)), None)
    return {} if first is None else {first.id: _load_expected(db, first, packed=True)}


@dataclass(frozen=True)
class _Ctx:
    """What one collect uses, as its caller gave it (nothing here changes while it runs)."""

    config: Config
    db: Databases
    api: Api
    clock: Callable[[], datetime]
    should_stop: Callable[[], bool]


def run(
    cfg: Config,
    db: Databases,
    api: Api,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] = never,
    *,
    preloaded: dict[int, dict[int, Expected]] | None = None,
    paused: str | None = None,
) -> CollectOutcome:
    """Collect every open batch that has ended, after reconciliation (etl.pipeline runs it first).
    `preloaded`: sent rows already read (`preload`), consumed batch by batch; `paused`: the reason
    reconciliation paused submission, if it did."""
    ctx = _Ctx(cfg, db, api, clock, should_stop)
    out = CollectOutcome(paused=paused)
    preloaded = {} if preloaded is None else preloaded
    with ctx.db.main.begin() as conn:
        open_ = intents.open_intents(conn)
    for intent in open_:
        if ctx.should_stop():
            break
        assert intent.batch_id is not None
        out.batches_checked += 1
        expected = preloaded.pop(intent.id, None)  # dropped here if this batch has not ended
        try:
            if not _check_batch(ctx, intent, out, expected):
                break
        except failpoints.FailpointHit:
            raise  # a simulated kill: the process ends here, as a real one would
        except Exception as exc:  # recovery loop: one batch never stops the others
            _batch_failed(ctx, intent, out, exc)
    log.info(
        "collect_finished",
        batches_checked=out.batches_checked,
        batches_collected=out.batches_collected,
        succeeded=out.succeeded,
        requeued=out.requeued,
        dead=out.dead,
        archived=out.archived,
    )
    return out


def _check_batch(
    ctx: _Ctx, intent: Intent, out: CollectOutcome, expected: dict[int, Expected] | None
) -> bool:
    """Retrieve one batch and, once it has ended, collect it. False: the run must stop (systemic)."""
    assert intent.batch_id is not None
    try:
        remote = ctx.api.provider.retrieve(intent.batch_id)
    except ProviderError as exc:
        if exc.kind == "systemic":
            with ctx.db.main.begin() as conn:
                state.pause(conn, str(exc), ctx.clock())
            out.paused = str(exc)
            out.problems.append(str(exc))
            log.error("collect_stopped", error=str(exc))
            return False
        out.problems.append(str(exc))
        log.warning("retrieve_failed", batch_id=intent.batch_id, error=str(exc))
        with ctx.db.main.begin() as conn:
            intents.note_error(conn, intent.id, f"retrieve failed: {exc}")
        return True
    with ctx.db.main.begin() as conn:
        intents.update_remote(conn, intent.id, remote)
        if not remote.ended and intent.error:
            intents.note_error(conn, intent.id, None)
    if not remote.ended:
        return True
    failpoints.hit("collect.after_retrieve")
    # Archived only on the API's word: our clock against the API's creation time could be days off,
    # and re-queuing results that still exist pays for them twice.
    if remote.archived_at is not None:
        _archive(ctx, intent, out)
        return True
    _collect_batch(ctx, intent, remote, out, expected)
    return True


def _batch_failed(ctx: _Ctx, intent: Intent, out: CollectOutcome, exc: Exception) -> None:
    """Whatever one batch raised ends that batch's attempt: the reason is recorded on the batch (where
    `etl status --check` reads it) and the run goes on to the next batch. A failure of the machine (disk
    full, read-only, out of memory) stops the run instead, named as such: every batch would fail alike."""
    found = environmental(exc, "while collecting")
    reason = f"collect failed: {found or describe(exc)}"
    out.problems.append(f"batch {intent.batch_id}: {reason}")
    log.error("batch_collect_failed", batch_id=intent.batch_id, error=reason)
    try:
        with ctx.db.main.begin() as conn:
            intents.note_error(conn, intent.id, clean(reason))
    except Exception as note_exc:  # recovery loop: the failure to record it is itself reported
        if found is None:
            found = environmental(note_exc, "while recording a failed collect")
        if found is None:
            raise
    if found is not None:
        raise found from None


def _archive(ctx: _Ctx, intent: Intent, out: CollectOutcome) -> None:
    now = ctx.clock()
    with ctx.db.main.begin() as conn:
        if not intents.mark_archived(conn, intent.id, ARCHIVED_REASON):
            return
        per_task = q.tasks_of(conn, intent.id, DocStatus.SUBMITTED)
        n = q.requeue_all_submitted(conn, intent.id, ARCHIVED_REASON, now)
        events.record_tasks(conn, now, "archived", per_task, "results archived before collection", intent.id)
    out.archived += n
    log.error("batch_results_archived", batch_id=intent.batch_id, requeued=n, paid_again=True)


def _load_expected(db: Databases, intent: Intent, *, packed: bool = False) -> dict[int, Expected]:
    with reading(db.main) as conn:
        rows = q.sent_rows(conn, intent.id, packed=packed)
    as_utc = cache(_enqueued_at)  # once per distinct value
    return {
        qid: Expected(doc_key, task, attempts, status, as_utc(at))
        for qid, doc_key, task, attempts, status, at in rows
    }


def _enqueued_at(value: Any) -> datetime | None:
    """A row's `enqueued_at` as stored. SQLite keeps whatever text a hand-written INSERT gave it: a value
    that is no timestamp is left out of the warehouse row rather than stopping the whole batch."""
    try:
        return schema.as_utc(value)
    except (TypeError, ValueError, AttributeError):
        return None


class _Writer:
    """Writes a batch's chunks on a thread of its own, in order, while the caller reads the next chunk.

    Reading and parsing the stream is Python work; writing a chunk is mostly waiting for the database
    (PostgreSQL's server, SQLite's page writes and fsync, both outside the GIL), so the two overlap. At
    most one chunk waits while another is written. The first error stops the writing (later chunks are
    dropped: their rows stay `submitted` and are collected again) and is raised to the reader at its next
    `put` or at `finish`.

    Where the batch's queue rows are settled once (`settlement.settles_per_batch`), each chunk's results
    are committed as it comes, and the chunk handed over by `finish` settles every chunk of the stream.
    """

    def __init__(self, ctx: _Ctx, expected: dict[int, Expected], totals: settlement.Totals) -> None:
        self.ctx = ctx
        self.expected = expected
        self.totals = totals
        self.per_batch = settlement.settles_per_batch(ctx.db)
        self._queue: queue.Queue[tuple[settlement.Chunk, bool] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._unsettled: settlement.Chunk | None = None  # written chunks' queue transitions (per batch)
        self.busy_seconds = 0.0  # writing chunks
        self.waited_seconds = 0.0  # the reader waiting for the writer: the database is the slower side
        self._resources = ExitStack()
        self._conn = self._resources.enter_context(bulk_writes(ctx.db.main))  # used by the thread only
        self._thread = threading.Thread(target=self._run, name="etl-collect-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                chunk, last = item
                if self._error is None:
                    started = time.perf_counter()
                    self._write(chunk, last)
                    self.busy_seconds += time.perf_counter() - started
                    if not last:
                        failpoints.hit("collect.mid_stream")
            except BaseException as exc:  # handed to the reader, which raises it
                self._error = exc
            finally:
                self._queue.task_done()

    def _write(self, chunk: settlement.Chunk, last: bool) -> None:
        if not self.per_batch:
            settlement.write(self.ctx.db, self.ctx.clock(), self._conn, chunk, self.expected, self.totals)
            return
        settlement.write(
            self.ctx.db, self.ctx.clock(), self._conn, chunk, self.expected, self.totals, settle=False
        )
        if self._unsettled is None:
            self._unsettled = chunk
        else:
            self._unsettled.absorb(chunk)
        if last:
            unsettled, self._unsettled = self._unsettled, None
            settlement.write(self.ctx.db, self.ctx.clock(), self._conn, unsettled, self.expected, self.totals)

    def _check(self) -> None:
        if self._error is not None:  # kept: the writer writes nothing more once it has failed
            raise self._error

    def _hand_over(self, chunk: settlement.Chunk, last: bool) -> None:
        self._check()
        started = time.perf_counter()
        self._queue.put((chunk, last))
        self.waited_seconds += time.perf_counter() - started

    def put(self, chunk: settlement.Chunk) -> None:
        """Hand over a chunk from the middle of the stream."""
        if chunk.size:
            self._hand_over(chunk, False)

    def finish(self, chunk: settlement.Chunk) -> None:
        """Hand over the stream's last chunk and wait until everything is written and settled; raise the
        writer's error, if any."""
        self._hand_over(chunk, True)
        started = time.perf_counter()
        self._queue.join()
        self.waited_seconds += time.perf_counter() - started
        self._check()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._resources.close()


def _collect_batch(
    ctx: _Ctx,
    intent: Intent,
    remote: RemoteBatch,
    out: CollectOutcome,
    expected: dict[int, Expected] | None = None,
) -> None:
    with gc_paused():
        totals = settlement.Totals()
        writer = _Writer(ctx, expected if expected is not None else _load_expected(ctx.db, intent), totals)
        try:
            _stream_batch(ctx, intent, remote, writer, out)
        finally:
            writer.close()
            out.succeeded += totals.succeeded
            out.requeued += totals.requeued
            out.dead += totals.dead


def _stream_batch(
    ctx: _Ctx, intent: Intent, remote: RemoteBatch, writer: _Writer, out: CollectOutcome
) -> None:
    assert intent.batch_id is not None
    settings = ctx.config.collect
    started = time.perf_counter()
    new_chunk = _chunk_maker(ctx, intent, remote, writer.expected)
    extras = Extras()
    for attempt in range(settings.stream_retries + 1):
        try:
            read = _read_pass(ctx, intent, writer, new_chunk)
        except ResultsGone as exc:
            _results_gone(ctx, intent, out, exc)
            return
        extras = read.extras
        pending = _judge_pass(ctx, intent, out, read, writer.expected, attempt == settings.stream_retries)
        if pending is None:
            return  # an adoption undone
        if read.error is None and not pending:
            failpoints.hit("collect.before_mark_collected")
            with ctx.db.main.begin() as conn:
                if intents.mark_collected(conn, intent.id, ctx.clock()) and extras.total:
                    events.record(
                        conn, ctx.clock(), "extra_results", None, extras.total, extras.reason(), intent.id
                    )
            _report_extras(intent, extras, out)
            out.batches_collected += 1
            log.info(
                "batch_collected",
                batch_id=intent.batch_id,
                results=len(read.seen),
                extra_lines=extras.total,
                seconds=round(time.perf_counter() - started, 2),
                writing_seconds=round(writer.busy_seconds, 2),
                waiting_for_writes_seconds=round(writer.waited_seconds, 2),
            )
            return
        why = (
            read.error
            or f"stream ended with {len(pending)} of the {intent.request_count} sent rows unanswered"
        )
        log.warning(
            "results_incomplete",
            batch_id=intent.batch_id,
            attempt=attempt + 1,
            reason=why,
            pending=len(pending),
        )
        if attempt < settings.stream_retries:
            _backoff_sleep(attempt, settings.stream_backoff_seconds)
    _report_extras(intent, extras, out)
    out.problems.append(
        f"batch {intent.batch_id}: results incomplete after {settings.stream_retries + 1} tries"
    )
    with ctx.db.main.begin() as conn:
        intents.note_error(conn, intent.id, "results incomplete; will retry on the next collect")


def _chunk_maker(
    ctx: _Ctx, intent: Intent, remote: RemoteBatch, expected: dict[int, Expected]
) -> Callable[[], settlement.Chunk]:
    """A new empty chunk for each part of the stream, all sharing one meter."""
    meter = Meter(ctx.config.pricing)

    unique_keys = capabilities(ctx.db.warehouse).bulk_copy and len(
        {(e.doc_key, e.task) for e in expected.values()}
    ) == len(expected)

    def new_chunk() -> settlement.Chunk:
        encoder = Encoder(ctx.db.warehouse.dialect)  # one per chunk: its timestamp memo stays small
        return settlement.Chunk(intent, remote, ctx.config, encoder, meter, ctx.clock(), unique_keys)

    return new_chunk


@dataclass
class _Pass:
    """One read of a batch's results stream: what its lines were."""

    seen: set[int] = field(default_factory=set)  # rows answered
    extras: Extras = field(default_factory=lambda: Extras())
    unreadable: list[str] = field(default_factory=list)  # lines with no custom_id string
    elsewhere: dict[int, str] = field(default_factory=dict)  # legacy ids: rows no longer in this intent
    moved: set[int] = field(default_factory=set)  # rows this intent sent that a run before this one settled
    error: str | None = None  # the stream broke
    suffix: str | None = None  # `prompt.id_suffix` of the intent read (None: a legacy intent)

    def sort(
        self, intent: Intent, expected: dict[int, Expected], line: bytes
    ) -> tuple[int, Expected, Any] | None:
        """Pure: what one result line is; (row, its expectation, result) when it is a result to write."""
        cid, result = _read_line(line)
        if cid is None:  # names no row, so settles none (a cut line leaves the batch short)
            self.unreadable.append(clean(bytes(line[:80]).decode("utf-8", "replace"), 80))
            return None
        qid = None if self.suffix is None else row_of(cid, self.suffix)
        if qid is not None:
            kind = "row"  # what whose_line says of it, without splitting the id
        else:
            kind, qid = whose_line(intent, cid)
        if qid is None:
            self.extras.add(kind, cid)
            return None
        exp = expected.get(qid)
        if exp is None:
            if qid in self.elsewhere or qid in self.moved:
                self.extras.add("duplicate", cid)
            elif kind == "legacy":
                self.elsewhere[qid] = cid
            else:
                self.moved.add(qid)  # sent by this intent, re-queued by an earlier pass: counts, no write
            return None
        if qid in self.seen:
            self.extras.add("duplicate", cid)
            return None
        self.seen.add(qid)
        if exp.status != DocStatus.SUBMITTED:
            return None  # settled by an earlier pass or run
        return qid, exp, result


def _read_pass(
    ctx: _Ctx, intent: Intent, writer: _Writer, new_chunk: Callable[[], settlement.Chunk]
) -> _Pass:
    """Read the stream once, handing the results to the writer chunk by chunk. Raises `ResultsGone`."""
    assert intent.batch_id is not None
    settings = ctx.config.collect
    read = _Pass(suffix=own_suffix(intent))
    chunk = new_chunk()
    # The first chunk is handed over early, so the writer starts while the rest is read.
    limit = min(settings.chunk_size, max(FIRST_CHUNK_MIN, settings.chunk_size // 8))
    try:
        for line in ctx.api.provider.iter_result_lines(intent.batch_id, settings.stream_timeout_seconds):
            answer = read.sort(intent, writer.expected, line)
            if answer is None:
                continue
            chunk.add(*answer)
            if chunk.size >= limit:
                writer.put(chunk)
                chunk = new_chunk()
                limit = settings.chunk_size
    except ResultsGone:
        writer.finish(chunk)
        raise
    except ProviderError as exc:
        read.error = str(exc)
    writer.finish(chunk)
    return read


def _results_gone(ctx: _Ctx, intent: Intent, out: CollectOutcome, exc: ResultsGone) -> None:
    assert intent.batch_id is not None
    log.error("results_gone", batch_id=intent.batch_id, error=str(exc))
    if _archived_says_the_api(ctx, intent.batch_id):
        _archive(ctx, intent, out)
        return
    # a refused read is not proof that the results are gone: try again next run
    problem = f"batch {intent.batch_id}: results unavailable ({exc}); the API does not say archived"
    out.problems.append(problem)
    with ctx.db.main.begin() as conn:
        intents.note_error(conn, intent.id, problem)


def _judge_pass(
    ctx: _Ctx, intent: Intent, out: CollectOutcome, read: _Pass, expected: dict[int, Expected], last: bool
) -> list[int] | None:
    """After a pass: the rows this intent sent still unanswered (complete when none and the stream did not
    break; extra lines never keep a batch open), or None when an adoption was undone."""
    read.moved |= _moved_on(ctx, read.elsewhere)
    for qid, cid in read.elsewhere.items():
        if qid not in read.moved:
            read.extras.add("foreign", cid)
    if read.unreadable:
        # A line cut by a broken stream reads the same; it is a problem only if it is still there in the
        # pass that completes the batch, or in the last one (a retried pass usually brings it whole).
        log.warning("results_unreadable", batch_id=intent.batch_id, lines=len(read.unreadable))
    if (
        intent.adopted
        and intent.installation is None
        and not read.seen
        and (read.extras.foreign or read.moved)
    ):
        _disown(ctx, intent, out)
        return None
    pending = [qid for qid, e in expected.items() if e.status == DocStatus.SUBMITTED]
    if read.unreadable and ((read.error is None and not pending) or last):
        out.problems.append(
            f"batch {intent.batch_id}: {len(read.unreadable)} unreadable result line(s) (no custom_id), e.g. "
            f"{read.unreadable[:3]}; nothing written for them"
        )
    return pending


def _read_line(line: bytes) -> tuple[str | None, Any]:
    """A results line's custom_id and result; (None, None) when the line names no row: not JSON, not an
    object, or no string custom_id. Whatever the result holds is the settlement's to judge, per row."""
    try:
        obj = codec.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; nesting deeper than Python's stack
        return None, None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(cid, str):
        return None, None
    return cid, obj.get("result")


@dataclass
class Extras:
    """Result lines that answer no row this intent sent: counted, said once, never waited for."""

    foreign: list[str] = field(default_factory=list)  # not an id of this installation
    other_batch: list[str] = field(default_factory=list)  # ours, but another intent's row
    duplicates: list[str] = field(default_factory=list)

    def add(self, kind: str, cid: object) -> None:
        target = {"other_batch": self.other_batch, "duplicate": self.duplicates}.get(kind, self.foreign)
        target.append(str(cid)[:80])

    @property
    def total(self) -> int:
        return len(self.foreign) + len(self.other_batch) + len(self.duplicates)

    def reason(self) -> str:
        return (
            f"{len(self.other_batch)} line(s) for another batch's rows, {len(self.foreign)} for ids never "
            f"sent by this installation, {len(self.duplicates)} duplicate(s); nothing written for them"
        )


def own_suffix(intent: Intent) -> str | None:
    """What every custom_id `intent` sent ends with; None for a legacy intent (ids `q<row>`)."""
    return None if intent.installation is None else id_suffix(intent.id, intent.installation)


def whose_line(intent: Intent, cid: object) -> tuple[str, int | None]:
    """Whose answer a result line of `intent`'s batch is: ("row", qid) a row this intent sent;
    ("legacy", qid) a legacy `q<row>` id (an intent sent before issue 20: its rows are looked up);
    ("other_batch", None) a row of ours sent by another intent; ("foreign", None) anything else."""
    sent = parse_custom_id(cid)
    if sent is None:
        return "foreign", None
    if intent.installation is None:
        return ("legacy", sent.queue_id) if sent.installation is None else ("foreign", None)
    if sent.installation != intent.installation:
        return "foreign", None
    if sent.intent != intent.id:
        return "other_batch", None
    return "row", sent.queue_id


def _report_extras(intent: Intent, extras: Extras, out: CollectOutcome) -> None:
    if not extras.total:
        return
    out.problems.append(f"batch {intent.batch_id}: {extras.reason()}")
    log.error(
        "results_unexpected",
        batch_id=intent.batch_id,
        other_batch=len(extras.other_batch),
        foreign=len(extras.foreign),
        duplicates=len(extras.duplicates),
        examples=(extras.other_batch + extras.foreign + extras.duplicates)[:5],
    )


def _archived_says_the_api(ctx: _Ctx, batch_id: str) -> bool:
    """Whether the API itself says the batch's results are archived (a failed look says no)."""
    try:
        return ctx.api.provider.retrieve(batch_id).archived_at is not None
    except ProviderError:
        return False


def _moved_on(ctx: _Ctx, elsewhere: dict[int, str]) -> set[int]:
    """Results for rows that exist but no longer point at this intent: a run before this one settled them
    (a re-queued row loses its batch_ref; it may even sit in a newer batch by now). Nothing is written
    for them, but they count towards the batch being complete."""
    if not elsewhere:
        return set()
    with reading(ctx.db.main) as conn:
        return q.existing_ids(conn, list(elsewhere))


def _disown(ctx: _Ctx, intent: Intent, out: CollectOutcome) -> None:
    """An adopted batch whose results carry none of our custom_ids was someone else's: undo the adoption."""
    now = ctx.clock()
    reason = f"adopted batch {intent.batch_id} turned out not to be ours; re-queued"
    with ctx.db.main.begin() as conn:
        if intents.mark_archived(conn, intent.id, reason):
            per_task = q.tasks_of(conn, intent.id, DocStatus.SUBMITTED)
            q.requeue_all_submitted(conn, intent.id, reason, now)
            events.record_tasks(conn, now, "released", per_task, "wrong batch adopted", intent.id)
    out.problems.append(reason)
    log.error("adoption_undone", batch_id=intent.batch_id)


def _backoff_sleep(attempt: int, base: float, cap: float = 60.0) -> None:
    """Real sleep between retries of a broken results stream (a network wait, not a wait for time)."""
    time.sleep(min(cap, base * (2**attempt)))
