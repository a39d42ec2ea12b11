"""The morning report: what happened since the last one, what is pending, and what is late.

Built from the aggregated events and the live tables; logged as one `morning_report` event and saved
so `etl report` can print it later as a readable block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from etl import costs, paths
from etl.clock import isoformat
from etl.config import Config
from etl.store import batches as intents
from etl.store import events, state
from etl.store import queue as q
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import BatchStatus, DocStatus

log = structlog.get_logger("etl.report")

UNRECORDED = "(task not recorded)"
KINDS = ("submitted", "succeeded", "requeued", "dead", "rejected", "released", "archived")


def _hours(delta: timedelta) -> float:
    return round(delta.total_seconds() / 3600, 1)


def build(
    cfg: Config, db: Databases, now: datetime, since: datetime | None, *, costs_since: datetime | None = None
) -> dict[str, Any]:
    """The report for the period from `since`; its money per task from `costs_since` when given (`etl
    status` shows tonight's, since the budget's night began, beside a report of the moment)."""
    with reading(db.main) as conn:
        rows = events.summary_since(conn, since)
        open_ = intents.open_intents(conn)
        unknown = intents.with_status(conn, BatchStatus.UNKNOWN, BatchStatus.SENDING)
        queue_counts = q.counts(conn)
        oldest = q.oldest_queued(conn)
        paused = state.pause_reason(conn)
    per_task, failures, totals = _tally(rows)
    pending, late = [_batch_entry(i, now) for i in open_], _late_batches(open_, now, cfg)
    late += _unknown_creates(unknown, now, cfg.submit.reconcile_grace_seconds)
    report = {
        "generated_at": isoformat(now),
        "since": isoformat(since),
        "tasks": {task: dict(v) for task, v in sorted(per_task.items())},
        "failures": dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tokens_and_cost": totals,
        "pending_batches": pending,
        "late": late,
        "queue": dict(_ordered(queue_counts, STATUS_ORDER)),
        "oldest_queued_age_hours": None if oldest is None else _hours(now - oldest),
        "oldest_queued_at": isoformat(oldest),  # exact, for the metrics page (etl/metrics.py)
        "submission_paused": paused,
        "paths": paths.summary(rows, cfg.pricing),
    }
    report.update(costs.section(cfg, db, now, since if costs_since is None else costs_since))
    return report


FAILURE_KINDS = ("requeued", "dead", "rejected", "released", "archived", "extra_results", "unexplained")


def _tally(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, int], dict[str, Any]]:
    """The batch path's aggregated events as documents per task and kind, documents per failure reason,
    and the tokens and money of what succeeded (money as decimal strings: JSON has no decimal)."""
    per_task: dict[str, dict[str, Any]] = defaultdict(lambda: {k: 0 for k in KINDS})
    failures: dict[str, int] = defaultdict(int)
    totals: dict[str, Any] = {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_write_tokens": 0,
        "cache_read_tokens": 0,
        "cost_usd": Decimal(0),
        "standard_cost_usd": Decimal(0),
    }
    for r in rows:
        if r["kind"] in paths.LIVE_KINDS:
            continue  # the live path's own section (etl/paths.py)
        if r["kind"] == "noted":  # `done` with a reason (an answer without text): counted in `succeeded` too
            failures[f"succeeded with a note: {r['reason'] or 'unspecified'}"] += int(r["documents"] or 0)
            continue
        task = r["task"] or UNRECORDED  # whole-intent events of versions before they were split per task
        per_task[task][r["kind"]] += int(r["documents"] or 0)
        if r["kind"] in FAILURE_KINDS:
            failures[f"{r['kind']}: {r['reason'] or 'unspecified'}"] += int(r["documents"] or 0)
        if r["kind"] == "succeeded":
            for key in totals:
                totals[key] += r[key] or 0
    # Money is exact (Decimal sums of the stored rows) and leaves as decimal strings (JSON has no decimal).
    totals["savings_usd"] = totals["standard_cost_usd"] - totals["cost_usd"]
    for key in ("cost_usd", "standard_cost_usd", "savings_usd"):
        totals[key] = costs.usd_text(totals[key])
    return per_task, failures, totals


def _batch_entry(intent: intents.Intent, now: datetime) -> dict[str, Any]:
    created = intent.remote_created_at or intent.created_at
    return {
        "batch_id": intent.batch_id,
        # A cancel asked of the API leaves the intent `submitted` until the batch ends: say so.
        "status": "canceling" if intent.processing_status == "canceling" else intent.status,
        "requests": intent.request_count,
        "counts": intent.request_counts,
        "age_hours": _hours(now - created),
        "results_expire_at": isoformat(intent.results_expire_at),
    }


def _late_batches(open_: Sequence[intents.Intent], now: datetime, cfg: Config) -> list[dict[str, Any]]:
    """Open batches ended long ago and still not collected, or whose results are about to vanish."""
    late_after = timedelta(days=cfg.collect.late_after_days)
    warn_before = timedelta(days=cfg.collect.warn_before_archive_days)
    late: list[dict[str, Any]] = []
    for intent in open_:
        entry = _batch_entry(intent, now)
        if intent.ended_at is not None and now - intent.ended_at > late_after:
            late.append(
                {**entry, "why": f"ended {_hours(now - intent.ended_at)} h ago and still not collected"}
            )
        elif intent.results_expire_at is not None and intent.results_expire_at - now < warn_before:
            late.append({**entry, "why": f"results vanish in {_hours(intent.results_expire_at - now)} h"})
    return late


def _unknown_creates(unknown: Sequence[intents.Intent], now: datetime, grace: float) -> list[dict[str, Any]]:
    """Batch creates whose outcome is unknown, each with when it is released and how to release it now."""
    late: list[dict[str, Any]] = []
    for intent in unknown:
        sent = intent.sent_at or intent.created_at
        release_at = sent + timedelta(seconds=grace)
        when = (
            f"released at the first reconcile after {isoformat(release_at)} if the API's list shows no batch "
            "of its requests"
            if release_at > now
            else f"past its grace since {isoformat(release_at)}: released once the API's list proves no batch "
            "holds its requests"
        )
        late.append(
            {
                "batch_id": None,
                "intent": intent.id,
                "status": intent.status,
                "requests": intent.request_count,
                "release_not_before": isoformat(release_at),
                "why": f"create outcome unknown since {isoformat(sent)}; {when} "
                f"(or now, at the risk of paying twice: etl reconcile --release {intent.id})",
            }
        )
    return late


def morning(cfg: Config, db: Databases, now: datetime, *, log_body: bool = True) -> dict[str, Any]:
    """Build, save and log the report covering everything since the previous one.

    `log_body=False` (a person at a terminal, who is shown `render(report)`): the log line says only that
    the report was made and whether it needs attention, not the whole report on one line."""
    with reading(db.main) as conn:
        last = events.last_report(conn)
    report = build(cfg, db, now, last[0] if last else None)
    with db.main.begin() as conn:
        events.save_report(conn, now, last[0] if last else None, report)
    level = log.warning if report["late"] or report["submission_paused"] else log.info
    if log_body:
        level("morning_report", **report)
    else:
        level("morning_report", late=len(report["late"]), submission_paused=report["submission_paused"])
    return report


COLUMNS = {
    "submitted": "sent to the API in a batch",
    "succeeded": "answer written to etl_results",
    "requeued": "failed for a transient reason, back in the queue for the next night",
    "dead": "gave up: a permanent error or submit.max_attempts failures (`etl retry` sends them again)",
    "rejected": "bad input, never sent: reason below (`etl retry` after fixing the row)",
    "released": "a batch create whose outcome stayed unknown, given back to the queue unsent",
    "archived": "results were gone (29 days) before collection: re-queued, will be paid again",
}
STATUS_ORDER = tuple(s.value for s in DocStatus)


def _ordered(counts: dict[str, Any], order: tuple[str, ...]) -> list[tuple[str, Any]]:
    """`counts` in a fixed order, whatever order it was stored in (PostgreSQL's JSONB sorts keys)."""
    known = [(k, counts[k]) for k in order if k in counts]
    return known + sorted((k, v) for k, v in counts.items() if k not in order)


def _header(report: dict[str, Any]) -> list[str]:
    return [f"Morning report {report['generated_at']} (since {report['since'] or 'the beginning'})"]


def _tasks(report: dict[str, Any]) -> list[str]:
    tasks = report.get("tasks") or {}
    width = max([20, *(len(t) + 2 for t in tasks)])
    header = f"{'documents per task':<{width}}" + "".join(f"{k:>11}" for k in KINDS)
    lines = [header, "-" * len(header)]
    for task in sorted(tasks):
        counts = tasks[task]
        lines.append(f"{task:<{width}}" + "".join(f"{counts.get(k, 0):>11}" for k in KINDS))
    if not tasks:
        lines.append("(nothing happened in this period)")
    lines += ["", "columns:"] + [f"  {k:<10} {why}" for k, why in COLUMNS.items()]
    return lines


def _money(report: dict[str, Any]) -> list[str]:
    money = report["tokens_and_cost"]
    return [
        f"tokens: input {money['input_tokens']:,}  output {money['output_tokens']:,}  "
        f"cache write {money['cache_write_tokens']:,}  cache read {money['cache_read_tokens']:,}",
        f"cost: ${Decimal(money['cost_usd']):.4f} with the Batches API; "
        f"${Decimal(money['standard_cost_usd']):.4f} at standard prices; saved ${Decimal(money['savings_usd']):.4f}",
    ]


def _failures(report: dict[str, Any]) -> list[str]:
    failures = report.get("failures") or {}
    if not failures:
        return []
    ordered = sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))
    return ["failures by reason (count, what happened: why):"] + [
        f"  {n:>8}  {reason}" for reason, n in ordered
    ]


def _queue(report: dict[str, Any]) -> list[str]:
    lines = [f"queue now: {', '.join(f'{k} {v}' for k, v in _ordered(report['queue'], STATUS_ORDER))}"]
    if report["oldest_queued_age_hours"] is not None:
        lines.append(f"oldest queued document: {report['oldest_queued_age_hours']} h old")
    return lines


def _pending(report: dict[str, Any]) -> list[str]:
    if not report["pending_batches"]:
        return []
    lines = ["pending batches:"]
    for b in report["pending_batches"]:
        lines.append(
            f"  {b['batch_id']}  {b['status']:<9} {b['requests']:>7} requests  age {b['age_hours']} h  "
            f"results until {b['results_expire_at']}  counts {b['counts']}"
        )
    return lines


def _alerts(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if report["late"]:
        lines.append("!! LATE OR AT RISK:")
        for b in report["late"]:
            lines.append(f"  !! {b.get('batch_id') or 'intent ' + str(b.get('intent'))}: {b['why']}")
    if report["submission_paused"]:
        if lines:
            lines.append("")
        lines.append(f"!! SUBMISSION PAUSED: {report['submission_paused']} (fix it, then run: etl resume)")
    return lines


Section = Callable[[dict[str, Any]], list[str]]


# The readable report is these sections in this order, separated by a blank line; an empty one is left
# out. A new part of the report is a function added here (reading only its own keys of the report).
def _paths(report: dict[str, Any]) -> list[str]:
    """Documents and cost per path, batch and live (etl/paths.py)."""
    return paths.render(report["paths"])[1:] if report.get("paths") else []


SECTIONS: list[Section] = [
    _header,
    _tasks,
    _money,
    _paths,
    costs.render_tasks,
    costs.render_budget,
    _failures,
    _queue,
    _pending,
    _alerts,
]


def render(report: dict[str, Any]) -> str:
    """The readable block printed by `etl report` (and by `etl collect` on a terminal)."""
    blocks = [lines for section in SECTIONS if (lines := section(report))]
    return "\n\n".join("\n".join(lines) for lines in blocks)
