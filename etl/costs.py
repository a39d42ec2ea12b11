"""Money in the report and `etl status`: per task and model, what the API charged, what it would have cost
at standard prices, what the estimate said before sending (and how close it was), and tonight's budget.

Kept apart from `etl.report` (which calls `section` and `render`) so the report's layout and its money
can change independently. Money leaves as decimal strings: JSON has no decimal type, and a float would
undo the exact sums.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from etl import budget
from etl.config import Config
from etl.store import events, spend
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import MONEY_UNIT


def usd_text(value: Decimal) -> str:
    """Money as JSON carries it: a decimal string with the stored precision."""
    return str(Decimal(value).quantize(MONEY_UNIT))


def by_task(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """A per-task mapping in the one order every output uses: the whole night's cap (`*`) first, then
    tasks by name, whatever order it was stored in (PostgreSQL's JSONB sorts keys its own way)."""
    return sorted(values.items(), key=lambda kv: (kv[0] != budget.ALL, kv[0]))


def section(cfg: Config, db: Databases, now: datetime, since: datetime | None) -> dict[str, Any]:
    """The report's `costs` (per task, for the period) and `budget` (tonight) entries."""
    night = budget.night_of(now, cfg.schedule.zone)
    with reading(db.main) as conn:
        rows = events.summary_since(conn, since)
        checked = spend.estimates_of_collected(conn, since)
        tonight = spend.night_summary(conn, night)
        waiting = spend.waiting_for_budget(conn, budget.BUDGET_REASON)
    per_task: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["kind"] != "succeeded" or r["task"] is None:
            continue
        entry = per_task.setdefault(
            r["task"],
            {"documents": 0, "cost": Decimal(0), "standard": Decimal(0)},
        )
        entry["documents"] += int(r["documents"])
        entry["cost"] += r["cost_usd"]
        entry["standard"] += r["standard_cost_usd"]
    tasks: dict[str, Any] = {}
    for name in sorted(set(per_task) | set(checked)):
        got = per_task.get(name, {"documents": 0, "cost": Decimal(0), "standard": Decimal(0)})
        est = checked.get(name)
        task = cfg.tasks.get(name)
        accuracy = None
        if est is not None and est["estimated_usd"] > 0:
            accuracy = str((est["actual_usd"] / est["estimated_usd"]).quantize(Decimal("0.001")))
        tasks[name] = {
            "model": task.model if task is not None else (est or {}).get("model"),
            "documents": got["documents"],
            "cost_usd": usd_text(got["cost"]),
            "standard_cost_usd": usd_text(got["standard"]),
            "savings_usd": usd_text(got["standard"] - got["cost"]),
            "estimated_usd": None if est is None else usd_text(est["estimated_usd"]),
            "charged_for_estimated_usd": None if est is None else usd_text(est["actual_usd"]),
            "accuracy": accuracy,
        }
    caps = budget.caps(cfg)
    reserved = {task: t["reserved"] for task, t in tonight.items()}
    return {
        "costs": tasks,
        "budget": {
            "night": night,
            "caps_usd": {k: usd_text(v) for k, v in by_task(caps)},
            "reserved_usd": usd_text(sum(reserved.values(), Decimal(0))),
            "reserved_by_task_usd": {k: usd_text(v) for k, v in sorted(reserved.items())},
            "sent_documents": sum(t["documents"] for t in tonight.values()),
            "estimated_usd": usd_text(sum((t["estimated"] for t in tonight.values()), Decimal(0))),
            "waiting_documents": dict(by_task(waiting)),
        },
    }


def render_tasks(report: dict[str, Any]) -> list[str]:
    """Cost per task and model, with the estimate's accuracy (nothing for a report saved before it existed)."""
    tasks = report.get("costs")
    if not tasks:
        return []
    lines = [
        "cost per task (USD):",
        f"  {'task':<16}{'model':<28}{'docs':>8}{'charged':>14}{'standard':>14}{'saved':>14}"
        f"{'estimated':>14}{'accuracy':>10}",
    ]
    for name, t in by_task(tasks):
        lines.append(
            f"  {name:<16}{t['model']!s:<28}{t['documents']:>8}{usd(t['cost_usd']):>14}"
            f"{usd(t['standard_cost_usd']):>14}{usd(t['savings_usd']):>14}"
            f"{usd(t['estimated_usd']):>14}{t['accuracy'] or '-':>10}"
        )
    lines.append(
        "  accuracy = what the API charged for the collected batches / what was estimated before sending"
    )
    return lines


def render_budget(report: dict[str, Any]) -> list[str]:
    """Tonight's cap, what was sent under it and what waits."""
    b = report.get("budget")
    if not b:
        return []
    caps = b["caps_usd"]
    cap_text = (
        ", ".join(f"${plain(v)}" + ("" if k == budget.ALL else f" for {k}") for k, v in by_task(caps))
        if caps
        else "no cap"
    )
    lines = [
        f"budget for the night of {b['night']}: {cap_text}; sent {b.get('sent_documents', 0):,} document(s), "
        f"estimated ${usd(b.get('estimated_usd', '0'))}, upper bound ${usd(b['reserved_usd'])}"
    ]
    if b["waiting_documents"]:
        waiting = ", ".join(f"{k} {v}" for k, v in by_task(b["waiting_documents"]))
        lines.append(f"  waiting for the budget: {waiting}")
    return lines


def plain(value: str | Decimal) -> str:
    """An amount as a person writes it: `200`, `1.5`, `0.000001`."""
    return format(Decimal(value).normalize(), "f")


def usd(value: str | Decimal | None) -> str:
    """An amount for a table: four decimals with thousands separators, `-` for none."""
    if value is None:
        return "-"
    return f"{Decimal(value):,.4f}"
