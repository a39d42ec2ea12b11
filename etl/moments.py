"""The one time syntax of every `--since`, `--until` and `--older-than`: a moment, given either as an
ISO 8601 date or date-time (UTC unless it says otherwise) or as a duration ago (`90s`, `90m`, `24h`,
`7d`, `2w`, decimals allowed). Parsed once, when the command line is read, so a bad value is one usage
error (exit 2) whichever command it was given to; resolved against the command's clock afterwards."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SYNTAX = "an ISO date or date-time (2026-12-01, 2026-12-01T06:00, UTC unless it says) or a duration ago (90m, 24h, 7d, 2w)"


@dataclass(frozen=True)
class Moment:
    """A point in time as the operator wrote it: `ago` back from now, or `at` exactly."""

    text: str
    ago: timedelta | None = None
    at: datetime | None = None

    def resolve(self, now: datetime) -> datetime:
        if self.at is not None:
            return self.at
        assert self.ago is not None
        return now - self.ago


def parse(text: str) -> Moment:
    """A `Moment`, or ValueError saying the syntax."""
    value = text.strip()
    m = _DURATION.match(value)
    if m:
        return Moment(text, ago=timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))}))
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give {SYNTAX}") from None
    return Moment(text, at=at if at.tzinfo is not None else at.replace(tzinfo=UTC))


def argument(text: str) -> Moment:
    """`parse` as an argparse type: a bad value is a usage error, exit 2, for every option alike."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
