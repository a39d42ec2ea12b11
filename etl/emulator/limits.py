"""What the live Messages endpoint needs to be tested honestly: latency, rate limits, standard-rate prices.

- Latency: each `POST /v1/messages` answers after `latency_seconds` plus up to `jitter_seconds` (uniform,
  seeded), slept on the request's own thread outside the state lock, so slow answers never hold up others.
- Limits: at most `requests_per_minute` requests and `tokens_per_minute` tokens (input + output of the
  answers given) in any 60 s of *virtual* time; past either, 429 `rate_limit_error` with `retry-after`
  (whole seconds until the window frees) and `anthropic-ratelimit-*` headers, as the API answers. Every
  successful answer carries the same headers. 0 means no limit.
- 529 bursts come from the fault rules (`{"endpoint": "messages", "action": "status", "status": 529,
  "times": 5}`), already applied before the handler.

Prices: the ledger's live section is priced at the standard rate (USD per million tokens below; cache
writes 1.25x (5 min) / 2x (1 h), cache reads 0.1x of the input price), separately from batch billing.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from etl.emulator.clock import format_time

WINDOW = timedelta(seconds=60)

# Standard prices, USD per million tokens (input, output), by model id prefix.
STANDARD_PRICES: dict[str, tuple[float, float]] = {
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4-2": (15.0, 75.0),
}


def standard_cost(model: str, usage: Mapping[str, Any]) -> float:
    """What a Messages answer costs at the standard rate (0 for a model without a price here)."""
    price = next((p for name, p in STANDARD_PRICES.items() if model.startswith(name)), None)
    if price is None:
        return 0.0
    detail = usage.get("cache_creation") or {}
    w1h = int(detail.get("ephemeral_1h_input_tokens") or 0)
    w5m = int(usage.get("cache_creation_input_tokens") or 0) - w1h
    inputs = (
        int(usage.get("input_tokens") or 0)
        + 1.25 * w5m
        + 2.0 * w1h
        + 0.1 * int(usage.get("cache_read_input_tokens") or 0)
    )
    return (inputs * price[0] + int(usage.get("output_tokens") or 0) * price[1]) / 1_000_000


@dataclass(frozen=True)
class LiveSettings:
    latency_seconds: float = 0.0
    jitter_seconds: float = 0.0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> LiveSettings:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown live settings: {', '.join(sorted(unknown))}")
        values = {}
        for name, default in cls().__dict__.items():
            value = raw.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            values[name] = type(default)(value)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Limits:
    """The sliding windows of requests and tokens, on the emulator's virtual clock. Thread-safe."""

    def __init__(self, settings: LiveSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or LiveSettings()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests: deque[datetime] = deque()
        self._tokens: deque[tuple[datetime, int]] = deque()
        self.rejected = 0  # 429s answered by the limits

    def configure(self, settings: LiveSettings) -> None:
        with self._lock:
            self.settings = settings
            self._requests.clear()
            self._tokens.clear()

    def reset(self) -> None:
        self.configure(LiveSettings())
        with self._lock:
            self.rejected = 0

    def delay(self) -> float:
        with self._lock:
            s = self.settings
            return s.latency_seconds + (self._rng.uniform(0, s.jitter_seconds) if s.jitter_seconds else 0.0)

    def _trim(self, now: datetime) -> None:
        while self._requests and self._requests[0] <= now - WINDOW:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= now - WINDOW:
            self._tokens.popleft()

    def _headers(self, now: datetime) -> dict[str, str]:
        s = self.settings
        headers: dict[str, str] = {}
        if s.requests_per_minute:
            reset = self._requests[0] + WINDOW if self._requests else now
            headers["anthropic-ratelimit-requests-limit"] = str(s.requests_per_minute)
            headers["anthropic-ratelimit-requests-remaining"] = str(
                max(0, s.requests_per_minute - len(self._requests))
            )
            headers["anthropic-ratelimit-requests-reset"] = format_time(reset)
        if s.tokens_per_minute:
            used = sum(n for _, n in self._tokens)
            reset = self._tokens[0][0] + WINDOW if self._tokens else now
            headers["anthropic-ratelimit-tokens-limit"] = str(s.tokens_per_minute)
            headers["anthropic-ratelimit-tokens-remaining"] = str(max(0, s.tokens_per_minute - used))
            headers["anthropic-ratelimit-tokens-reset"] = format_time(reset)
        return headers

    def admit(self, now: datetime) -> tuple[bool, dict[str, str], str]:
        """(admitted, headers, why-not). An admitted request counts against the request window at once."""
        with self._lock:
            s = self.settings
            self._trim(now)
            waits = []
            why = ""
            if s.requests_per_minute and len(self._requests) >= s.requests_per_minute:
                waits.append(self._requests[0] + WINDOW - now)
                why = f"requests per minute ({s.requests_per_minute})"
            if s.tokens_per_minute and sum(n for _, n in self._tokens) >= s.tokens_per_minute:
                waits.append(self._tokens[0][0] + WINDOW - now)
                why = why or f"tokens per minute ({s.tokens_per_minute})"
            if waits:
                self.rejected += 1
                headers = self._headers(now)
                headers["retry-after"] = str(max(1, math.ceil(max(waits).total_seconds())))
                return False, headers, why
            if s.requests_per_minute:
                self._requests.append(now)
            return True, self._headers(now), ""

    def spent(self, now: datetime, tokens: int) -> dict[str, str]:
        """Count an answer's tokens; the headers to send with it."""
        with self._lock:
            if self.settings.tokens_per_minute:
                self._tokens.append((now, tokens))
            self._trim(now)
            return self._headers(now)
