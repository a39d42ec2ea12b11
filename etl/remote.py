"""What the API says about one batch, as plain data (kept apart from the SDK so reading it is cheap)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class RemoteBatch:
    id: str
    processing_status: str
    request_counts: dict[str, int]
    created_at: datetime
    expires_at: datetime | None
    ended_at: datetime | None
    archived_at: datetime | None
    cancel_initiated_at: datetime | None
    results_url: str | None

    @property
    def total(self) -> int:
        return sum(self.request_counts.values())

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"
