"""The live path's daily spend cap (`live.daily_spend_cap_usd`): what was spent today, what the settler
holds and has not committed, and the upper bounds of the calls in flight, counted together in exact
Decimals before a call leaves."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from etl.budget import message_text, tokens_of
from etl.config import Task
from etl.costs import usd_text
from etl.pricing import Meter, Usage
from etl.store import live as store
from etl.store.engine import reading


class Spend:
    """Shared by the worker's threads and its settler; every amount changes under one lock."""

    def __init__(self, cap: Decimal, meter: Meter, engine: Engine, clock: Callable[[], datetime]) -> None:
        self.cap = cap
        self.meter = meter
        self.engine = engine
        self.clock = clock
        self.unsettled = Decimal(0)  # answers handed to the settler, not yet committed
        self.inflight = Decimal(0)  # upper bounds of the calls in flight (the daily cap counts them)
        self._lock = threading.Lock()

    def reserve(self, task: Task, params: Mapping[str, Any]) -> tuple[Decimal | None, Decimal]:
        """Count this call's upper bound against the daily cap before it leaves, with the calls already in
        flight (4 calls checked at once against settled spend alone crossed the cap by a third): (the bound
        reserved, or None when it would cross the cap; what was spent or in flight). Exact Decimals."""
        if self.cap <= 0:
            return Decimal(0), Decimal(0)
        bound = self.bound(task, params)
        now = self.clock()
        with self._lock:  # the read under the lock: two threads never both take the last of the cap
            with reading(self.engine) as conn:
                spent = store.spent_since(conn, now.replace(hour=0, minute=0, second=0, microsecond=0))
            committed = spent + self.unsettled + self.inflight
            if committed + bound > self.cap:
                return None, committed
            self.inflight += bound
        return bound, committed

    def release(self, bound: Decimal) -> None:
        """The call reserved for has ended (its answer, if any, is `answered` already)."""
        with self._lock:
            self.inflight -= bound

    def answered(self, standard: Decimal) -> None:
        """An answer's cost, counted against the cap before the settler commits it."""
        with self._lock:
            self.unsettled += standard

    def settled(self, amount: Decimal) -> None:
        """Answers committed: their cost is in the database now."""
        with self._lock:
            self.unsettled -= amount

    def bound(self, task: Task, params: Mapping[str, Any]) -> Decimal:
        """The most a call can cost at the standard price: its input at 4 characters a token (the system
        prompt at the cache-write price when it is cached) and `max_tokens` of output."""
        rates = self.meter.rates(task.model)
        if rates is None:
            return Decimal(0)
        system = tokens_of(task.system) if task.system else 0
        usage = Usage(
            input_tokens=tokens_of(message_text(params)) + (0 if task.cache_system else system),
            output_tokens=task.max_tokens,
            cache_write_1h=system if task.cache_system else 0,
        )
        return rates.usd(rates.units(usage))

    def cap_reason(self, committed: Decimal, bound: Decimal) -> str:
        """Every amount with all its digits: a cap of $0.0005 is not printed as $0.00."""

        def exact(value: Decimal) -> str:
            return usd_text(value).rstrip("0").rstrip(".")

        return (
            f"daily live spend cap reached (${exact(committed)} spent or in flight, this call up to "
            f"${exact(bound)}, of ${self.cap:f}, live.daily_spend_cap_usd)"
        )
