"""The morning report's split by path: documents and cost of the batch and of the live Messages API.

Built from the same aggregated events as the rest of the report (`succeeded` for the batch,
`live_succeeded`, `live_fallback` and `live_billed_twice` for the live path); the live path is priced at
the standard rate, and `batch_would_cost_usd` is what the same tokens would have cost in the batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from etl.config import Pricing
from etl.costs import usd_text

LIVE_KINDS = frozenset({"live_succeeded", "live_fallback", "live_billed_twice"})


def summary(rows: Iterable[Mapping[str, Any]], pricing: Pricing) -> dict[str, Any]:
    """Documents and cost per path; money exact (Decimal sums of the stored rows), as decimal strings."""
    batch: dict[str, Any] = {"documents": 0, "cost_usd": Decimal(0)}
    live: dict[str, Any] = {"documents": 0, "cost_usd": Decimal(0), "possibly_billed_twice": 0}
    fell_back: dict[str, int] = defaultdict(int)
    for r in rows:
        kind, documents = r["kind"], int(r["documents"] or 0)
        if kind == "succeeded":
            batch["documents"] += documents
            batch["cost_usd"] += Decimal(r["cost_usd"] or 0)
        elif kind == "live_succeeded":
            live["documents"] += documents
            live["cost_usd"] += Decimal(r["cost_usd"] or 0)
        elif kind == "live_billed_twice":
            live["possibly_billed_twice"] += documents
        elif kind == "live_fallback":
            fell_back[str(r["reason"] or "unspecified")] += documents
    live["batch_would_cost_usd"] = usd_text(live["cost_usd"] * pricing.batch_discount)
    live["cost_usd"] = usd_text(live["cost_usd"])
    live["fell_back"] = dict(fell_back)
    batch["cost_usd"] = usd_text(batch["cost_usd"])
    return {"batch": batch, "live": live}


def _usd(value: Any) -> Decimal:
    """An amount of a report, saved as a decimal string (or, by older versions, a float)."""
    return Decimal(str(value))


def render(paths: Mapping[str, Any]) -> list[str]:
    b, v = paths["batch"], paths["live"]
    lines = [
        "",
        f"batch path: {b['documents']:,} documents, ${_usd(b['cost_usd']):.4f}",
        f"live path:  {v['documents']:,} documents, ${_usd(v['cost_usd']):.4f} at standard prices "
        f"(${_usd(v['batch_would_cost_usd']):.4f} in the batch)",
    ]
    if v["possibly_billed_twice"]:
        lines.append(
            f"  !! {v['possibly_billed_twice']} live document(s) possibly billed twice "
            "(a call in flight when a process died, or retried after an ambiguous failure)"
        )
    for reason, n in v["fell_back"].items():
        lines.append(f"  {n} urgent document(s) fell back to the batch: {reason}")
    return lines
