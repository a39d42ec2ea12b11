"""The morning job: find ended batches, stream their results in chunks into the warehouse, settle rows.

A batch is `collected` only when every custom_id it sent has been seen exactly once. Each chunk is
applied with guarded updates (`status = 'submitted' AND batch_ref = :intent`), so a retried stream, a
re-run after a crash, or a second collector never applies a result twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from etl import failpoints, reconciler
from etl.config import Task
from etl.errors import ProviderError, ResultsGone, ResultsIncomplete
from etl.pricing import Usage, costs
from etl.prompt import queue_id_of
from etl.provider import backoff_sleep
from etl.remote import RemoteBatch
from etl.runtime import Runtime
from etl.schema import DocStatus
from etl.store import batches as intents
from etl.store import events, state, warehouse
from etl.store import queue as q
from etl.store.batches import Intent
from etl.store.engine import reading

log = structlog.get_logger("etl.collect")

PERMANENT_ERRORS = {"invalid_request_error", "not_found_error"}
SYSTEMIC_ERRORS = {"billing_error", "authentication_error", "permission_error"}
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


@dataclass
class _Expected:
    doc_key: str
    task: str
    attempts: int
    status: str
    enqueued_at: datetime | None = None


def run(rt: Runtime) -> CollectOutcome:
    out = CollectOutcome()
    # Unknown creates whose batch has ended can now be confirmed by their custom_ids and collected at once.
    reconciler.run(rt)
    with rt.engine.begin() as conn:
        open_ = intents.open_intents(conn)
    for intent in open_:
        if rt.should_stop():
            break
        assert intent.batch_id is not None
        out.batches_checked += 1
        try:
            remote = rt.provider.retrieve(intent.batch_id)
        except ProviderError as exc:
            if exc.kind == "systemic":
                with rt.engine.begin() as conn:
                    state.pause(conn, str(exc), rt.clock())
                out.problems.append(str(exc))
                log.error("collect_stopped", error=str(exc))
                break
            out.problems.append(str(exc))
            log.warning("retrieve_failed", batch_id=intent.batch_id, error=str(exc))
            continue
        with rt.engine.begin() as conn:
            intents.update_remote(conn, intent.id, remote)
        if not remote.ended:
            continue
        failpoints.hit("collect.after_retrieve")
        now = rt.clock()
        if remote.archived_at is not None or now >= remote.created_at + timedelta(days=29):
            _archive(rt, intent, out)
            continue
        _collect_batch(rt, intent, remote, out)
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


def _archive(rt: Runtime, intent: Intent, out: CollectOutcome) -> None:
    now = rt.clock()
    with rt.engine.begin() as conn:
        if not intents.mark_archived(conn, intent.id, ARCHIVED_REASON):
            return
        n = q.requeue_all_submitted(conn, intent.id, ARCHIVED_REASON, now)
        events.record(conn, now, "archived", None, n, "results archived before collection", intent.id)
    out.archived += n
    log.error("batch_results_archived", batch_id=intent.batch_id, requeued=n, paid_again=True)


def _load_expected(rt: Runtime, intent: Intent) -> dict[int, _Expected]:
    with reading(rt.engine) as conn:
        rows = q.sent_rows(conn, intent.id)
    return {
        qid: _Expected(doc_key, task, attempts, status, at)
        for qid, doc_key, task, attempts, status, at in rows
    }


def _collect_batch(rt: Runtime, intent: Intent, remote: RemoteBatch, out: CollectOutcome) -> None:
    assert intent.batch_id is not None
    settings = rt.config.collect
    expected = _load_expected(rt, intent)
    applier = _Applier(rt, intent, remote, expected, out)
    for attempt in range(settings.stream_retries + 1):
        seen: set[int] = set()
        foreign: list[str] = []
        elsewhere: dict[int, str] = {}  # rows no longer in this intent (re-queued, or in a newer batch)
        duplicates: list[str] = []
        buffer: list[tuple[int, dict[str, Any]]] = []
        error: str | None = None
        try:
            for line in rt.provider.iter_result_lines(intent.batch_id, settings.stream_timeout_seconds):
                try:
                    obj = json.loads(line)
                    cid = obj["custom_id"]
                    result = obj["result"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ResultsIncomplete(f"results of {intent.batch_id}: unreadable line ({exc})") from exc
                qid = queue_id_of(cid) if isinstance(cid, str) else None
                if qid is None:
                    foreign.append(str(cid))
                    continue
                if qid not in expected:
                    if qid in elsewhere:
                        duplicates.append(cid)
                    else:
                        elsewhere[qid] = cid
                    continue
                if qid in seen:
                    duplicates.append(cid)
                    continue
                seen.add(qid)
                if expected[qid].status != DocStatus.SUBMITTED:
                    continue  # settled by an earlier pass or run
                buffer.append((qid, result))
                if len(buffer) >= settings.chunk_size:
                    applier.apply(buffer)
                    buffer = []
                    failpoints.hit("collect.mid_stream")
        except ResultsGone as exc:
            applier.apply(buffer)
            log.error("results_gone", batch_id=intent.batch_id, error=str(exc))
            _archive(rt, intent, out)
            return
        except ProviderError as exc:
            error = str(exc)
        applier.apply(buffer)
        moved = _moved_on(rt, elsewhere)
        foreign += [cid for qid, cid in elsewhere.items() if qid not in moved]
        if foreign or duplicates:
            problem = (
                f"batch {intent.batch_id}: {len(foreign)} result(s) for custom_ids never sent "
                f"{foreign[:5]}, {len(duplicates)} duplicate(s) {duplicates[:5]}; nothing written for them"
            )
            out.problems.append(problem)
            log.error(
                "results_unexpected",
                batch_id=intent.batch_id,
                foreign=len(foreign),
                duplicates=len(duplicates),
                examples=(foreign + duplicates)[:5],
            )
        if intent.adopted and not seen and (foreign or moved):
            _disown(rt, intent, out)
            return
        pending = [qid for qid, e in expected.items() if e.status == DocStatus.SUBMITTED]
        if error is None and not pending and len(seen) + len(moved) == intent.request_count:
            failpoints.hit("collect.before_mark_collected")
            with rt.engine.begin() as conn:
                intents.mark_collected(conn, intent.id, rt.clock())
            out.batches_collected += 1
            log.info("batch_collected", batch_id=intent.batch_id, results=len(seen))
            return
        why = error or f"stream ended after {len(seen)} of {intent.request_count} results"
        log.warning(
            "results_incomplete",
            batch_id=intent.batch_id,
            attempt=attempt + 1,
            reason=why,
            pending=len(pending),
        )
        if attempt < settings.stream_retries:
            backoff_sleep(attempt, settings.stream_backoff_seconds)
    out.problems.append(
        f"batch {intent.batch_id}: results incomplete after {settings.stream_retries + 1} tries"
    )
    with rt.engine.begin() as conn:
        intents.note_error(conn, intent.id, "results incomplete; will retry on the next collect")


def _moved_on(rt: Runtime, elsewhere: dict[int, str]) -> set[int]:
    """Results for rows that exist but no longer point at this intent: a run before this one settled them
    (a re-queued row loses its batch_ref; it may even sit in a newer batch by now). Nothing is written
    for them, but they count towards the batch being complete."""
    if not elsewhere:
        return set()
    with reading(rt.engine) as conn:
        return q.existing_ids(conn, list(elsewhere))


def _disown(rt: Runtime, intent: Intent, out: CollectOutcome) -> None:
    """An adopted batch whose results carry none of our custom_ids was someone else's: undo the adoption."""
    now = rt.clock()
    reason = f"adopted batch {intent.batch_id} turned out not to be ours; re-queued"
    with rt.engine.begin() as conn:
        if intents.mark_archived(conn, intent.id, reason):
            n = q.requeue_all_submitted(conn, intent.id, reason, now)
            events.record(conn, now, "released", None, n, "wrong batch adopted", intent.id)
    out.problems.append(reason)
    log.error("adoption_undone", batch_id=intent.batch_id)


def _category(reason: str) -> str:
    """The short form of a row's reason that the report counts by: the error type, not its message."""
    if reason.startswith("gave up after"):
        last = reason.partition("last: ")[2]
        return f"max attempts reached (last: {last.split(':')[0]})"
    return reason.split(":")[0]


def _text_of(message: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in message.get("content") or [] if b.get("type") == "text")


class _Applier:
    """Turns a chunk of results into one warehouse write and one queue transaction."""

    def __init__(
        self,
        rt: Runtime,
        intent: Intent,
        remote: RemoteBatch,
        expected: dict[int, _Expected],
        out: CollectOutcome,
    ) -> None:
        self.rt = rt
        self.intent = intent
        self.remote = remote
        self.expected = expected
        self.out = out
        self.max_attempts = rt.config.submit.max_attempts

    def _failure(
        self,
        exp: _Expected,
        reason: str,
        counted: list[tuple[int, str]],
        dead: list[tuple[int, str]],
        qid: int,
    ) -> None:
        if exp.attempts + 1 >= self.max_attempts:
            dead.append((qid, f"gave up after {exp.attempts + 1} attempts; last: {reason}"))
        else:
            counted.append((qid, reason))

    def apply(self, chunk: list[tuple[int, dict[str, Any]]]) -> None:
        if not chunk:
            return
        rt = self.rt
        now = rt.clock()
        tasks: dict[str, Task] = dict(rt.config.tasks)
        rows: list[dict[str, Any]] = []
        done: list[int] = []
        counted: list[tuple[int, str]] = []
        free: list[tuple[int, str]] = []
        dead: list[tuple[int, str]] = []
        tally = events.Tally()
        systemic: str | None = None
        for qid, result in chunk:
            exp = self.expected[qid]
            kind = result.get("type")
            if kind == "succeeded":
                message = result.get("message") or {}
                text = _text_of(message)
                output_json = None
                task = tasks.get(exp.task)
                if task is not None and task.output_schema is not None:
                    try:
                        output_json = json.loads(text)
                    except ValueError:
                        output_json = None
                usage = Usage.from_api(message.get("usage") or {})
                model = str(message.get("model") or "")
                cost, standard = costs(rt.config.pricing, model, usage)
                rows.append(
                    {
                        "doc_key": exp.doc_key,
                        "task": exp.task,
                        "queue_id": qid,
                        "custom_id": f"q{qid}",
                        "output_text": text,
                        "output_json": output_json,
                        "model": model,
                        "stop_reason": message.get("stop_reason"),
                        "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens,
                        "cache_creation_input_tokens": usage.cache_write,
                        "cache_read_input_tokens": usage.cache_read,
                        "cost_usd": cost,
                        "standard_cost_usd": standard,
                        "batch_id": self.intent.batch_id,
                        "enqueued_at": exp.enqueued_at,
                        "batch_ended_at": self.remote.ended_at,
                        "collected_at": now,
                    }
                )
                done.append(qid)
                tally.add(
                    "succeeded",
                    exp.task,
                    None,
                    1,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cache_write_tokens=usage.cache_write,
                    cache_read_tokens=usage.cache_read,
                    cost_usd=cost,
                    standard_cost_usd=standard,
                )
            elif kind == "errored":
                err = ((result.get("error") or {}).get("error")) or {}
                etype = str(err.get("type") or "api_error")
                reason = f"{etype}: {err.get('message') or ''}".strip()
                if etype in PERMANENT_ERRORS:
                    dead.append((qid, reason))
                elif etype in SYSTEMIC_ERRORS:
                    free.append((qid, reason))
                    systemic = systemic or reason
                else:
                    self._failure(exp, reason, counted, dead, qid)
            elif kind in ("expired", "canceled"):
                self._failure(exp, f"{kind} before the model processed it", counted, dead, qid)
            else:
                self._failure(exp, f"unknown result type {kind!r}", counted, dead, qid)
        for qid, reason in counted:
            tally.add("requeued", self.expected[qid].task, _category(reason))
        for qid, reason in free:
            tally.add("requeued", self.expected[qid].task, _category(reason) + " (attempt not counted)")
        for qid, reason in dead:
            tally.add("dead", self.expected[qid].task, _category(reason))

        if not rt.same_database and rows:
            with rt.warehouse.begin() as wconn:
                warehouse.upsert(wconn, rows)
            failpoints.hit("collect.after_warehouse")
        with rt.engine.begin() as conn:
            if rt.same_database and rows:
                warehouse.upsert(conn, rows)
            q.mark_done(conn, self.intent.id, done, now)
            q.requeue(conn, self.intent.id, counted, now, count_attempt=True)
            q.requeue(conn, self.intent.id, free, now, count_attempt=False)
            q.kill(conn, self.intent.id, dead, now)
            tally.flush(conn, now, self.intent.id)
            if systemic:
                state.pause(conn, f"results carry {systemic}", now)
        if rt.same_database and rows:
            failpoints.hit("collect.after_warehouse")
        if counted or free:
            failpoints.hit("requeue.after_requeue")
        for qid in done:
            self.expected[qid].status = DocStatus.DONE
        for qid, _ in counted + free:
            self.expected[qid].status = DocStatus.QUEUED
        for qid, _ in dead:
            self.expected[qid].status = DocStatus.DEAD
        self.out.succeeded += len(done)
        self.out.requeued += len(counted) + len(free)
        self.out.dead += len(dead)
        if systemic:
            log.error("submission_paused", reason=systemic)
