"""The morning report's split by path: documents and cost of the batch and of the live Messages API.

Built from the same aggregated events as the rest of the report (`succeeded` for the batch,
`live_succeeded`, `live_fallback` and `live_billed_twice` for the live path); the live path is priced at
the standard rate, and `batch_would_cost_usd` is what the same tokens would have cost in the batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from etl.config import Pricing

LIVE_KINDS = frozenset({"live_succeeded", "live_fallback", "live_billed_twice"})


def summary(rows: Iterable[Mapping[str, Any]], pricing: Pricing) -> dict[str, Any]:
    batch = {"documents": 0, "cost_usd": 0.0}
    live: dict[str, Any] = {"documents": 0, "cost_usd": 0.0, "possibly_billed_twice": 0}
    fell_back: dict[str, int] = defaultdict(int)
    for r in rows:
        kind, documents = r["kind"], int(r["documents"] or 0)
        if kind == "succeeded":
            batch["documents"] += documents
            batch["cost_usd"] += float(r["cost_usd"] or 0)
        elif kind == "live_succeeded":
            live["documents"] += documents
            live["cost_usd"] += float(r["cost_usd"] or 0)
        elif kind == "live_billed_twice":
            live["possibly_billed_twice"] += documents
        elif kind == "live_fallback":
            fell_back[str(r["reason"] or "unspecified")] += documents
    live["batch_would_cost_usd"] = round(live["cost_usd"] * float(pricing.batch_discount), 6)
    live["cost_usd"] = round(live["cost_usd"], 6)
    live["fell_back"] = dict(fell_back)
    batch["cost_usd"] = round(batch["cost_usd"], 6)
    return {"batch": batch, "live": live}


def render(paths: Mapping[str, Any]) -> list[str]:
    b, v = paths["batch"], paths["live"]
    lines = [
        "",
        f"batch path: {b['documents']:,} documents, ${b['cost_usd']:.4f}",
        f"live path:  {v['documents']:,} documents, ${v['cost_usd']:.4f} at standard prices "
        f"(${v['batch_would_cost_usd']:.4f} in the batch)",
    ]
    if v["possibly_billed_twice"]:
        lines.append(
            f"  !! {v['possibly_billed_twice']} live document(s) possibly billed twice "
            "(a call in flight when a process died, or retried after an ambiguous failure)"
        )
    for reason, n in v["fell_back"].items():
        lines.append(f"  {n} urgent document(s) fell back to the batch: {reason}")
    return lines
