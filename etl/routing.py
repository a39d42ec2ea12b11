"""Which path a queue row takes: the nightly batch (half price) or the live Messages API (now).

THE RULE, in one place. A queued row goes live when the batch path cannot meet its deadline:

    mode = 'live'                                            -> live (the shorthand for "due now")
    mode = 'batch'                                           -> batch, whatever its due_by
    mode IS NULL and due_by IS NULL                          -> batch (today's behaviour)
    mode IS NULL and due_by < next submit slot + allowance   -> live
    otherwise                                                -> batch, and it saves half

`allowance` is `live.batch_latency_hours` (default 24 h: the Batches API's bound on processing). The
"next submit slot" is the first `schedule.submit_cron` slot after now; for the submit run itself, whose
batch leaves now, it is now (`departing=True`), and so it is for everyone during the first
`live.slot_hold_minutes` (default 30) after a slot fired: the night's submit is still claiming then, and
without the hold the live worker (whose "next slot" had just become tomorrow's) took the rows due between
slot + allowance and tomorrow's slot + allowance at the standard price, although tonight's batch meets
them at half. During the hold both sides use the same instant, so no row is on both; a row that arrives
in the hold after the submit finished and that only the live path can meet waits for the hold to end. A task with `live = false` never takes the live path: its
urgent rows fall back to the batch with that reason, as do urgent rows once the day's live spend passes
`live.daily_spend_cap_usd` (etl/live.py writes `mode = 'batch'` and the reason on the row).

`cutoff` computes the instant; `goes_live` applies the rule to one row in Python; the same rule as SQL
is `etl.store.queue.live_routed(cutoff)`, which both the live worker's claim and the batch claim use, so
a row is on exactly one side at any instant.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from etl import scheduling
from etl.config import Config
from etl.store.schema import Mode


def next_submit(config: Config, now: datetime) -> datetime:
    """The first submit slot after `now` (a day later if the cron never fires within a year)."""
    sch = config.schedule
    return scheduling.next_fire(sch.submit_cron, sch.zone, now) or now + timedelta(days=1)


def in_slot_hold(config: Config, now: datetime) -> bool:
    """A submit slot fired within the last `live.slot_hold_minutes`: its batch is (treated as) leaving now."""
    hold = timedelta(minutes=config.live.slot_hold_minutes)
    if hold <= timedelta(0):
        return False
    sch = config.schedule
    fired = scheduling.latest_fire(sch.submit_cron, sch.zone, now)
    return fired is not None and now - fired < hold


def cutoff(config: Config, now: datetime, *, departing: bool = False) -> datetime:
    """Rows due before this instant cannot wait for the batch: the batch leaves at the next slot (or now,
    when `departing` or within the hold after a slot) and may take `live.batch_latency_hours` to end."""
    leaves = now if departing or in_slot_hold(config, now) else next_submit(config, now)
    return leaves + timedelta(hours=config.live.batch_latency_hours)


def batch_cutoff(config: Config, now: datetime) -> datetime | None:
    """What a batch leaving now leaves to the live path: rows due before this instant (or None: with
    `live.enabled = false` there is no live path and the batch takes every row). The submit's claim and
    `etl estimate` both use it, so the estimate prices what the submit would send."""
    return cutoff(config, now, departing=True) if config.live.enabled else None


def goes_live(mode: str | None, due_by: datetime | None, limit: datetime) -> bool:
    """The rule for one row, given `limit = cutoff(...)`."""
    if mode == Mode.LIVE:
        return True
    if mode is not None or due_by is None:
        return False
    return due_by < limit
