"""The end state every end-to-end finding must reach, and the small readings that judge it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from etl.emulator import EmulatorControl
from etl.status import status
from tests.conftest import queue_rows
from tests.harness import Harness
from tests.ledger import by_row

GRACE = 600  # the tests' reconcile_grace_seconds


def billed_twice(control: EmulatorControl) -> int:
    return sum(1 for n in by_row(control.ledger()).values() if n > 1)


def open_batches(rt: Harness) -> int:
    with rt.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM etl_batches "
                    "WHERE status IN ('claimed', 'sending', 'unknown', 'submitted', 'ended')"
                )
            ).scalar_one()
        )


def problems(rt: Harness) -> list[str]:
    _, healthy, found = status(rt.config, rt.db, rt.owner, rt.clock())
    assert healthy == (not found)
    return found


def assert_settled(rt: Harness, control: EmulatorControl, good: int) -> None:
    """The end state every finding must reach."""
    rows = queue_rows(rt)
    assert sum(1 for r in rows.values() if r["status"] == "done") == good
    assert billed_twice(control) == 0
    assert open_batches(rt) == 0
    assert problems(rt) == []


def docs(n: int, prefix: str = "d") -> list[dict[str, Any]]:
    return [{"doc_key": f"{prefix}{i:04d}", "body": f"document {prefix} {i}"} for i in range(n)]
