"""`etl cancel`: cancel batches at the API and settle their rows as the API reports them.

A cancel is asked of the API, which answers `canceling`; the batch ends shortly after with each request
either `canceled` (never processed, never billed: the row goes back to the queue, no attempt counted) or
already `succeeded`/`errored` (collected like any other result). When the batch has ended by the time
the API answers, its rows are settled at once by a collect; otherwise the next collect (the daemon polls)
settles them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from etl.api import Api
from etl.errors import InputError, ProviderError
from etl.store import batches as intents
from etl.store.databases import Databases
from etl.store.engine import reading
from etl.store.schema import OPEN_BATCH_STATUSES

log = structlog.get_logger("etl.cancel")


@dataclass
class CancelOutcome:
    canceled: list[str] = field(default_factory=list)  # asked of the API
    ended: list[str] = field(default_factory=list)  # already ended when the API answered
    problems: list[str] = field(default_factory=list)


def targets(db: Databases, batch_ids: list[str], all_pending: bool) -> list[intents.Intent]:
    """The batches to cancel: the named ones (each must be one of ours and still open) or every open one."""
    with reading(db.main) as conn:
        if all_pending:
            return [i for i in intents.open_intents(conn) if i.batch_id and i.status == "submitted"]
        found = []
        for batch_id in batch_ids:
            intent = intents.by_batch_id(conn, batch_id)
            if intent is None:
                raise InputError(
                    f"batch {batch_id} is not one this etl sent (`etl status` lists pending batches); "
                    "nothing was canceled"
                )
            if intent.status not in OPEN_BATCH_STATUSES:
                raise InputError(f"batch {batch_id} is {intent.status}, not pending; nothing was canceled")
            if intent.status != "submitted":
                raise InputError(
                    f"batch {batch_id} has already ended: `etl collect` settles it; nothing was canceled"
                )
            found.append(intent)
        return found


def run(db: Databases, api: Api, batch_ids: list[str], *, all_pending: bool) -> CancelOutcome:
    out = CancelOutcome()
    for intent in targets(db, batch_ids, all_pending):
        assert intent.batch_id is not None
        try:
            remote = api.provider.cancel(intent.batch_id)
        except ProviderError as exc:
            out.problems.append(f"{intent.batch_id}: {exc}")
            log.error("batch_cancel_failed", batch_id=intent.batch_id, error=str(exc))
            continue
        with db.main.begin() as conn:
            intents.update_remote(conn, intent.id, remote)
        out.canceled.append(intent.batch_id)
        if remote.ended:
            out.ended.append(intent.batch_id)
        log.info(
            "batch_canceled",
            intent=intent.id,
            batch_id=intent.batch_id,
            processing_status=remote.processing_status,
            counts=remote.request_counts,
        )
    return out
