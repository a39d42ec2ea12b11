"""The two jobs as their stages run, in order: what `etl submit`, `etl collect`, the daemon and the demo call.

Each stage reads and writes the tables and takes what it needs as arguments; only this module knows
the order. Reconciliation runs first, split where the SDK's load is overlapped with database work:

- submit: the dead-owner rules (etl.recovery), the database's part of reconciliation, then the
  submitter, which is handed the API's part (`reconciler.match_remote`) and runs it just before its
  first create (its fence follows it), or at once when it claimed nothing and an unknown create waits.
  A submit with nothing to send and nothing to reconcile never calls the API, so it never loads the SDK.
- collect: the dead-owner rules, reconciliation (the sent rows of the first open batch are read while
  the SDK loads), then the collector.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from etl import collector, life, reconciler, recovery, submitter
from etl.api import Api
from etl.clock import never, utcnow
from etl.collector import CollectOutcome
from etl.config import Config
from etl.life import Identity
from etl.store.databases import Databases
from etl.submitter import SubmitOutcome


def submit(
    cfg: Config,
    db: Databases,
    api: Api,
    me: Identity,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] = never,
) -> SubmitOutcome:
    """Submit everything queued (up to `submit.max_batches_per_run` batches)."""
    held = submitter.preflight(cfg, db, clock())
    if held is not None:
        return held
    me = life.hold(
        db.main, me
    )  # before anything of ours is written: our rows are recovered the moment we die
    # rows claimed by a process proven dead go back now, not after its lease
    recovery.sweep(db, me.owner, clock())
    if submitter.may_call_api(db):
        api.warm()
    reconciled = reconciler.release_expired(db, clock())

    def match_remote() -> str | None:
        return reconciler.match_remote(cfg, db, api, reconciled, clock, should_stop).paused

    return submitter.run(cfg, db, api, me.owner, match_remote, clock, should_stop)


def collect(
    cfg: Config,
    db: Databases,
    api: Api,
    me: Identity,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] = never,
) -> CollectOutcome:
    """Collect every batch that has ended: its results into the warehouse, its rows settled."""
    # The SDK loads on a thread (1-3 s of CPU) while the database works: reconciliation's own part and,
    # when the SDK is not loaded yet (`etl collect`, not the daemon), the sent rows of the first open
    # batch, which a collect reads next anyway once that batch has ended. Nothing open and nothing to
    # reconcile: no API call, so no SDK (remote batches matching no record are then reported by the next
    # run that has something to ask, or by `etl reconcile`).
    asks = collector.may_call_api(db)
    if asks:
        api.warm()
    me = life.hold(db.main, me)
    recovery.sweep(db, me.owner, clock())  # the dead-owner rules (etl.recovery), as the daemon applies them
    reconciled = reconciler.release_expired(db, clock())
    if not asks:
        return collector.run(cfg, db, api, clock, should_stop, paused=reconciled.paused)
    preloaded = collector.preload(db, api)
    # Unknown creates whose batch has ended can now be confirmed by their custom_ids and collected at once.
    reconciler.match_remote(cfg, db, api, reconciled, clock, should_stop)
    return collector.run(cfg, db, api, clock, should_stop, preloaded=preloaded, paused=reconciled.paused)
