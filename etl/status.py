"""`etl status`: the queue, pending batches with progress and deadlines, recent runs, health."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from etl import budget, costs, disk, failures, live, reconciler, recovery, report
from etl.clock import isoformat
from etl.config import Config, ScheduleSettings
from etl.errors import StoreError
from etl.store import batches as intents
from etl.store import queue as q
from etl.store import state
from etl.store.databases import Databases, installation
from etl.store.engine import reading
from etl.store.schema import DocStatus


def status(cfg: Config, db: Databases, me: str, now: datetime) -> tuple[dict[str, Any], bool, list[str]]:
    """`etl status`: the report of the moment, with what needs a person (`me`: our owner, etl.liveness)."""
    dead = dead_owners(db, me, now)  # the dead-owner rules, applied here too: the queue below is after them
    # Money since tonight's budget began: what was charged and how close the estimates were, per task.
    info = report.build(cfg, db, now, since=now, costs_since=budget.night_start(now, cfg.schedule.zone))
    with reading(db.main) as conn:
        runs = state.last_runs(conn, limit=10)
    info["last_runs"] = [
        {
            "job": r.job,
            "slot": isoformat(r.slot),
            "outcome": r.outcome,
            "detail": r.detail,
            "started_at": isoformat(r.started_at),
            "ended_at": isoformat(r.ended_at),
        }
        for r in runs
    ]
    info["installation_id"] = installation(db, now)
    info["dead_owners"] = dead
    problems: list[str] = []
    latest: dict[str, str] = {}
    for r in runs:
        latest.setdefault(r.job, r.outcome)
    problems += [f"last {job} run {outcome}" for job, outcome in latest.items() if outcome == "failed"]
    problems += recovery_problems(cfg.schedule, runs, now)
    problems += [f"{b.get('batch_id') or 'intent ' + str(b.get('intent'))}: {b['why']}" for b in info["late"]]
    problems += _stuck(db, info)
    if info["submission_paused"]:
        problems.append(f"submission paused: {info['submission_paused']}")
    problems += live.health(cfg, db, now)
    problems += unexplained_batches(db, info)
    with reading(db.main) as conn:
        problems += failures.problems(conn)  # a one-shot submit or collect that failed outside the daemon
    return info, not problems, problems


def dead_owners(db: Databases, me: str, now: datetime) -> dict[str, Any]:
    """Work of processes proven dead (etl.recovery rules 1, 3, 4): their runs become `crashed`, their claims
    go back to the queue now. What was found is shown; a database that refuses the writes (a read-only
    role) is said, and the daemon or the next submit applies them."""
    try:
        found = recovery.sweep(db, me, now)
        released = reconciler.release_expired(db, now).released_claims if found.ended_leases else 0
    except (DBAPIError, StoreError) as exc:
        return {"error": f"not applied: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {
        "crashed_runs": found.crashed_runs,
        "intents_of_dead_owners": found.ended_leases,
        "claims_released": released,
    }


def unexplained_batches(db: Databases, info: dict[str, Any]) -> list[str]:
    """Batches of ours that no intent could take (etl.reconciler._explain_strays): billed, never collected."""
    with reading(db.main) as conn:
        found = state.with_prefix(conn, reconciler.UNEXPLAINED_KIND)
    info["unexplained_batches"] = found
    return [f"unexplained batch {bid}: {detail}" for bid, detail in sorted(found.items())]


def recovery_problems(sch: ScheduleSettings, runs: list[state.Run], now: datetime) -> list[str]:
    """A crashed run not yet re-run, and a partial submit that the night's retries did not complete."""
    newest: dict[str, state.Run] = {}
    for r in runs:
        newest.setdefault(r.job, r)
    out = []
    for job, r in newest.items():
        if r.outcome == "crashed" and not recovery.rerun_possible(sch, r, now):
            out.append(
                f"last submit run crashed ({r.detail}) and its slot {isoformat(r.slot)} is past "
                f"schedule.retry_until {sch.retry_until}: it is not re-run; the next night's submit takes "
                "what it left queued"
            )
        elif r.outcome == "crashed":
            out.append(f"last {job} run crashed ({r.detail}); the daemon re-runs it once it is leader")
        elif job == "submit" and r.outcome == "partial" and now >= recovery.cutoff(sch, r.slot):
            out.append(
                f"submit slot {isoformat(r.slot)} ended partial after {r.attempt} attempt(s) and was not "
                f"completed by schedule.retry_until {sch.retry_until}: {r.detail}"
            )
    return out


def _stuck(db: Databases, info: dict[str, Any]) -> list[str]:
    """Documents that nothing will move on without help (issue 12): named so `--check` fails on them."""
    problems: list[str] = []
    with reading(db.main) as conn:
        stranded = q.stranded(conn)
        failing = [i for i in intents.open_intents(conn) if i.error]
        waiting = q.waiting_in(conn, [i.id for i in failing])
        ended_waiting = q.waiting_in_ended(conn)
    info["stranded_rows"] = stranded
    if stranded.get(DocStatus.SUBMITTED):
        problems.append(
            f"{stranded[DocStatus.SUBMITTED]} row(s) 'submitted' with no open batch: sent (maybe billed) and "
            "never to be collected; set them back to 'queued' once you know they were not processed"
        )
    if stranded.get(DocStatus.CLAIMED):
        problems.append(
            f"{stranded[DocStatus.CLAIMED]} row(s) 'claimed' with no live intent: no submit will send them; "
            "set them back to 'queued'"
        )
    named = set()
    for i in failing:
        named.add(i.batch_id)
        problems.append(
            f"{i.batch_id}: last collect failed, {waiting.get(i.id, 0)} row(s) waiting: {i.error}"
        )
    for batch_id, rows, _error in ended_waiting:
        if batch_id not in named:  # a collect that stopped without a word (killed, or run by an older etl)
            problems.append(
                f"{batch_id}: ended, but {rows} row(s) still 'submitted' (billed, not yet stored): the last "
                "collect did not finish it; run `etl collect`"
            )
    problems += disk.problems(db)
    return problems


def render(info: dict[str, Any], problems: list[str]) -> str:
    lines = [f"installation: {info.get('installation_id')}"]
    lines.append(f"queue: {', '.join(f'{k} {v}' for k, v in info['queue'].items())}")
    dead = info.get("dead_owners") or {}
    if dead.get("error"):
        lines.append(f"dead owners: {dead['error']}")
    elif dead.get("crashed_runs") or dead.get("intents_of_dead_owners"):
        lines.append(
            f"dead owners: {len(dead['crashed_runs'])} run(s) marked crashed, "
            f"{len(dead['intents_of_dead_owners'])} intent(s) taken back, {dead['claims_released']} "
            "claim(s) returned to the queue"
        )
    if info["oldest_queued_age_hours"] is not None:
        lines.append(f"oldest queued: {info['oldest_queued_age_hours']} h")
    lines.append(f"pending batches: {len(info['pending_batches'])}")
    for b in info["pending_batches"]:
        counts = b["counts"] or {}
        done = sum(v for k, v in counts.items() if k != "processing")
        lines.append(
            f"  {b['batch_id']}  {b['status']:<9} {done}/{b['requests']} processed  age {b['age_hours']} h  "
            f"collect before {b['results_expire_at']}"
        )
    for r in info.get("last_runs", [])[:5]:
        lines.append(f"run {r['job']:<8} slot {r['slot']}  {r['outcome']}  {r['detail'] or ''}".rstrip())
    lines += costs.render_tasks(info)
    lines += costs.render_budget(info)
    lines.append("health: OK" if not problems else "health: PROBLEMS")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
