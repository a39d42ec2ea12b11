"""The record of a one-shot `etl submit` or `etl collect` that failed (run by hand or from cron, outside
the daemon), where `etl status --check` reads it.

The daemon records its own runs in `etl_runs`, by slot, and re-runs a slot by what it finds there; a CLI
run written there would disturb that. So a CLI failure is one `etl_state` fact per command,
`cli_failure:<command>`, holding the time and the one-line cause the operator saw; the command's next
successful run clears it. Writing it is best-effort: on a full disk or a database that is gone nothing can
be written, and nothing worse happens than the line already printed (status's disk check covers SQLite's
full disk)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import structlog
from sqlalchemy import Connection

from etl.clock import isoformat
from etl.store import state
from etl.store.databases import Databases

log = structlog.get_logger()

KIND = "cli_failure"
COMMANDS = frozenset({"submit", "collect"})
NOT_A_VERDICT = frozenset({75, 130, 141})  # paused (status shows the pause), interrupted, reader gone


def note(db: Databases, clock: Callable[[], datetime], command: str, code: int, cause: str | None) -> None:
    """After `etl <command>` ended with `code`: record its failure, or clear the last one on success."""
    if command not in COMMANDS or code in NOT_A_VERDICT:
        return
    if command == "collect" and code == 3:
        # The collect finished; what it reported needs no second record: a batch that could not be
        # collected carries its reason itself (etl_batches.error, which status reads), and a line that
        # named no row or another batch's row needs nothing more (status stays OK, as issue 21 promised).
        code = 0
    key = f"{KIND}:{command}"
    try:
        now = clock()
        with db.main.begin() as conn:
            if code != 0:
                state.set_value(conn, key, f"{isoformat(now)} {cause or f'exit code {code}'}", now)
            elif state.get_value(conn, key) is not None:  # read first: a healthy run takes no write lock
                state.forget(conn, key)
    except Exception as exc:  # best-effort: a full disk or a lost database has already been said
        log.debug("cli_failure_not_recorded", command=command, error=str(exc).splitlines()[:1])


def problems(conn: Connection) -> list[str]:
    """One line per command whose last run outside the daemon failed, for `etl status --check`."""
    out = []
    for command, value in sorted(state.with_prefix(conn, KIND).items()):
        at, _, cause = (value or "").partition(" ")
        out.append(f"last etl {command} run by hand failed at {at}: {cause}; run `etl {command}` again")
    return out
