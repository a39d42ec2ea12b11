"""The emulator's ledger read per queue row: a custom_id carries the row, the intent and the installation
(etl.prompt.custom_id), so a row sent twice is billed under two custom_ids. `by_row` folds them back into
the legacy `q<row>` key, summing the bills: a value above 1 is a row billed twice."""

from __future__ import annotations

from collections import Counter
from typing import Any

from etl.prompt import parse_custom_id


def row_key(cid: str) -> str:
    sent = parse_custom_id(cid)
    return cid if sent is None else f"q{sent.queue_id}"


def by_row(ledger: dict[str, Any], installation: str | None = None) -> dict[str, int]:
    """`ledger["billed"]` per queue row (`q<row>`); leaving out another installation's ids when `installation` is given."""
    out: Counter[str] = Counter()
    for cid, n in ledger["billed"].items():
        sent = parse_custom_id(cid)
        if installation is not None and sent is not None and sent.installation not in (None, installation):
            continue  # another installation's request
        out[row_key(cid)] += n
    return dict(out)
