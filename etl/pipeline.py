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

from etl import collector, life, reconciler, recovery, submitter
from etl.collector import CollectOutcome
from etl.runtime import Runtime
from etl.submitter import SubmitOutcome


def submit(rt: Runtime) -> SubmitOutcome:
    """Submit everything queued (up to `submit.max_batches_per_run` batches)."""
    held = submitter.preflight(rt)
    if held is not None:
        return held
    rt.me = life.hold(
        rt.engine, rt.me
    )  # before anything of ours is written: our rows are recovered the moment we die
    recovery.sweep(
        rt.db, rt.owner, rt.clock()
    )  # rows claimed by a process proven dead go back now, not after its lease
    if submitter.may_call_api(rt):
        rt.warm_provider()
    reconciled = reconciler.release_expired(rt.db, rt.clock())

    def match_remote() -> str | None:
        return reconciler.match_remote(rt, reconciled).paused

    return submitter.run(rt, match_remote)


def collect(rt: Runtime) -> CollectOutcome:
    """Collect every batch that has ended: its results into the warehouse, its rows settled."""
    # The SDK loads on a thread (1-3 s of CPU) while the database works: reconciliation's own part and,
    # when the SDK is not loaded yet (`etl collect`, not the daemon), the sent rows of the first open
    # batch, which a collect reads next anyway once that batch has ended.
    rt.warm_provider()
    rt.me = life.hold(rt.engine, rt.me)
    recovery.sweep(
        rt.db, rt.owner, rt.clock()
    )  # the dead-owner rules (etl.recovery), as the daemon applies them
    reconciled = reconciler.release_expired(rt.db, rt.clock())
    preloaded = collector.preload(rt)
    # Unknown creates whose batch has ended can now be confirmed by their custom_ids and collected at once.
    reconciler.match_remote(rt, reconciled)
    return collector.run(rt, preloaded, paused=reconciled.paused)
