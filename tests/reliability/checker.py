"""The judge run after every scenario: the queue, the batch records, the warehouse and the emulator's ledger.

Each invariant is a name, a verdict and, when it fails, the evidence. `fault` records whether the scenario's
injected fault was actually observed (a process died with -9, the ledger shows the ambiguous create...),
so no scenario can pass vacuously.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from tests.ledger import by_row

INVARIANTS = ("lost", "billed_twice", "dup_rows", "attempts", "stale_unknown", "fault")
TERMINAL = {"done", "dead", "rejected", "superseded"}
OPEN_INTENT = {"submitted", "ended"}
UNSETTLED_INTENT = {"claimed", "sending", "unknown"}


@dataclass
class Verdict:
    scenario: str
    results: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.results.values())

    def failures(self) -> list[str]:
        return [f"{name}: {why}" for name, (ok, why) in self.results.items() if not ok]


@dataclass(frozen=True)
class Snapshot:
    rows: list[dict[str, Any]]
    intents: list[dict[str, Any]]
    warehouse: list[dict[str, Any]]
    ledger: dict[str, Any]


def snapshot(engine: Engine, warehouse: Engine, ledger: dict[str, Any]) -> Snapshot:
    with engine.connect() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT id, doc_key, task, status, attempts, reason, batch_ref FROM etl_queue ORDER BY id"
                )
            )
        ]
        intents = [
            dict(r._mapping)
            for r in conn.execute(
                text("SELECT id, status, batch_id, created_at, sent_at, request_count FROM etl_batches")
            )
        ]
        installation = conn.execute(
            text("SELECT value FROM etl_state WHERE key = 'installation_id'")
        ).scalar_one_or_none()
    with warehouse.connect() as conn:
        wh = [
            dict(r._mapping)
            for r in conn.execute(text("SELECT doc_key, task, queue_id, custom_id FROM etl_results"))
        ]
    # Bills per queue row of this installation (a row sent twice is billed under two custom_ids).
    return Snapshot(rows, intents, wh, {**ledger, "billed": by_row(ledger, installation or "-")})


def _as_dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def check(
    snap: Snapshot,
    *,
    scenario: str,
    max_attempts: int,
    now: datetime,
    reconcile_cycle: timedelta,
    final: bool,
    fault: tuple[bool, str],
    allow_queued: bool = False,
    in_flight: bool = False,
) -> Verdict:
    """`final`: the scenario ran to completion, so every row must be settled and every intent closed.
    `allow_queued`: queued rows waiting for a retry (with a reason) are an accepted end state.
    `in_flight`: judged between steps, so a billed row may still be in an open batch (`submitted`, or
    `claimed` by an intent whose create is `unknown`) whose results are not collected yet."""
    v = Verdict(scenario)
    intents = {i["id"]: i for i in snap.intents}
    by_cid: dict[str, dict[str, Any]] = {f"q{r['id']}": r for r in snap.rows}
    wh_cids = Counter(w["custom_id"] for w in snap.warehouse)
    wh_by_key = {(w["doc_key"], w["task"]): w["custom_id"] for w in snap.warehouse}

    def superseded_by_newer(r: dict[str, Any]) -> bool:
        """A newer row of the same (doc_key, task) is done and holds the warehouse row: the document
        changed and was processed again, so the older result was rightly replaced."""
        newer = by_cid.get(wh_by_key.get((r["doc_key"], r["task"]), ""))
        return newer is not None and newer["id"] > r["id"] and newer["status"] == "done"

    lost: list[str] = []
    for r in snap.rows:
        cid = f"q{r['id']}"
        status = r["status"]
        if status == "done":
            if wh_cids[cid] == 0 and superseded_by_newer(r):
                pass
            elif wh_cids[cid] != 1:
                lost.append(f"{cid} done but {wh_cids[cid]} warehouse rows")
        elif status in ("dead", "rejected", "superseded"):
            if not r["reason"]:
                lost.append(f"{cid} {status} without a reason")
        elif status == "queued":
            if r["attempts"] and not r["reason"]:
                lost.append(f"{cid} re-queued without a reason")
            if final and not allow_queued:
                lost.append(f"{cid} still queued after the completion run ({r['reason']})")
        elif status == "claimed":
            intent = intents.get(r["batch_ref"])
            if final or intent is None or intent["status"] not in UNSETTLED_INTENT:
                lost.append(
                    f"{cid} claimed by intent {r['batch_ref']} in state {intent and intent['status']}"
                )
        elif status == "submitted":
            intent = intents.get(r["batch_ref"])
            if final or intent is None or intent["status"] not in OPEN_INTENT:
                lost.append(
                    f"{cid} submitted in intent {r['batch_ref']} in state {intent and intent['status']}"
                )
        else:
            lost.append(f"{cid} has unknown status {status}")
    for cid in snap.ledger.get("billed", {}):
        row = by_cid.get(cid)
        if in_flight and row is not None and row["status"] in ("submitted", "claimed"):
            continue  # its batch is open: the result is on its way
        if row is None or (row["status"] != "done" and not (allow_queued and row["status"] == "queued")):
            lost.append(f"{cid} was billed but its result is not in the warehouse ({row and row['status']})")
    v.results["lost"] = (not lost, "; ".join(lost[:5]) + (f" (+{len(lost) - 5})" if len(lost) > 5 else ""))

    twice = {cid: n for cid, n in snap.ledger.get("billed", {}).items() if n != 1}
    v.results["billed_twice"] = (not twice, f"billed more than once: {dict(list(twice.items())[:5])}")

    dups = [cid for cid, n in wh_cids.items() if n > 1]
    keys = Counter((w["doc_key"], w["task"]) for w in snap.warehouse)
    dup_keys = [k for k, n in keys.items() if n > 1]
    # Between steps a row may have its warehouse row before it is marked done: SQLite settles a batch's
    # queue rows after its last chunk, and a separate warehouse commits first. Its batch must be open.
    settling = ("submitted",) if in_flight else ()
    strays = [
        c
        for c in wh_cids
        if c not in by_cid or (by_cid[c]["status"] != "done" and by_cid[c]["status"] not in settling)
    ]
    v.results["dup_rows"] = (
        not dups and not dup_keys and not strays,
        f"duplicate custom_ids {dups[:5]}, duplicate keys {dup_keys[:5]}, rows for undone docs {strays[:5]}",
    )

    over = [f"q{r['id']}={r['attempts']}" for r in snap.rows if r["attempts"] > max_attempts]
    v.results["attempts"] = (not over, f"attempts above {max_attempts}: {over[:5]}")

    stale = []
    for i in snap.intents:
        if i["status"] in UNSETTLED_INTENT:
            since = _as_dt(i["sent_at"]) or _as_dt(i["created_at"])
            assert since is not None
            if since.tzinfo is None:
                since = since.replace(tzinfo=now.tzinfo)
            if final or now - since > reconcile_cycle:
                stale.append(f"intent {i['id']} {i['status']} since {since.isoformat()}")
        if final and i["status"] in OPEN_INTENT and not allow_queued:
            stale.append(f"intent {i['id']} ({i['batch_id']}) still {i['status']} after the completion run")
    v.results["stale_unknown"] = (not stale, "; ".join(stale[:5]))
    v.results["fault"] = fault
    return v
