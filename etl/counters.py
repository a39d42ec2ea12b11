"""The process's own counters for the metrics page (etl/metrics.py): what only this process saw.

Everything else on the page is read from the database at scrape time, so several daemons on one
PostgreSQL tell one truth; these few are per process and start at 0 with it (Prometheus' `rate` and
`increase` handle the reset). Made unregistered: the page that serves them registers them.
"""

from __future__ import annotations

from prometheus_client import Counter

LIVE_CALLS = Counter(
    "etl_live_calls",
    "Messages API calls made by this process's live worker (each retry counts).",
    registry=None,
)
LIVE_REFUSED = Counter(
    "etl_live_refused",
    "Live Messages API calls refused before any work (nothing billed): 429 rate limited, 529 overloaded.",
    ["code"],
    registry=None,
)
for _code in ("429", "529"):
    LIVE_REFUSED.labels(code=_code)  # both series exist from the start, so `increase` sees the first one

ALL = (LIVE_CALLS, LIVE_REFUSED)
