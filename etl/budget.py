"""What a document will cost before it is sent, and the nightly cap that decides whether it is sent.

Per document the only variable is the length of its prompt: input tokens are estimated locally at
4 characters a token (what `count_tokens` measures against is printed by `etl estimate --count-tokens`),
output at the task's `max_tokens` (an upper bound). A task that caches its system prompt pays the
prefix as a cache write or read:

- the *estimate* (what `etl estimate` prints, and what the report compares the bill with) counts one
  write per batch and reads for the rest;
- the *upper bound* (what the cap reserves) counts a write for every document, since cache hits inside
  a batch are best effort.

Everything per document is integer arithmetic at one scale (`Costing.scale`), so the submitter and the
estimator check 100,000 documents against the cap without Decimal work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from zoneinfo import ZoneInfo

from etl.config import Config, Task
from etl.pricing import Meter, Rates
from etl.store.schema import to_money
from etl.store.spend import Reservation

BUDGET_REASON = "waiting for the nightly budget"
CALIBRATION_KEY = "estimate.local_error"  # etl_state: what `etl estimate --count-tokens` last measured
CHARS_PER_TOKEN = 4
ALL = "*"  # the key of the whole night's cap beside per-task caps


def night_of(now: datetime, zone: ZoneInfo) -> str:
    """The night `now` belongs to: nights run from noon to noon in the schedule's time zone, named by the
    date of their evening (a submit at 00:30 on the 2nd spends the night of the 1st)."""
    return (now.astimezone(zone) - timedelta(hours=12)).date().isoformat()


def night_start(now: datetime, zone: ZoneInfo) -> datetime:
    """When the night of `now` began: noon of its date in the schedule's time zone."""
    local = (now.astimezone(zone) - timedelta(hours=12)).replace(hour=12, minute=0, second=0, microsecond=0)
    return local.astimezone(now.tzinfo)


def tokens_of(text: str) -> int:
    """The local estimate of a text's tokens: ceil(characters / 4)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def message_text(params: Mapping[str, object]) -> str:
    """The user message of params built by `etl.prompt.build_params`."""
    messages = params["messages"]
    assert isinstance(messages, list)
    content = messages[0]["content"]
    return content if isinstance(content, str) else ""


class TaskCost:
    """One task's prices as integers at the costing's scale (batch price)."""

    def __init__(self, task: Task, rates: Rates, scale: int, margin: tuple[int, int] = (1, 1)) -> None:
        self.task = task
        self.margin = margin  # input tokens of the upper bound: the local estimate x num / den
        self.system_tokens = tokens_of(task.system) if task.system else 0
        self.cached = task.cache_system and self.system_tokens > 0
        f: int = int(10 ** (scale - rates.scale - rates.discount_scale)) * rates.discount
        self.input: int = rates.input * f
        self.output: int = rates.output * f
        self.write: int = rates.write_1h * f  # prompt.build_params marks the system prompt with a 1 h TTL
        self.read: int = rates.read * f
        self.max_output: int = task.max_tokens * self.output
        prefix = self.write if self.cached else self.input
        self.fixed: int = self.max_output + self._scaled(self.system_tokens) * prefix  # per document

    def _scaled(self, tokens: int) -> int:
        num, den = self.margin
        return tokens if num == den else -(-tokens * num // den)

    def upper_bound(self, message_tokens: int) -> int:
        """A document's reservation: its message, the prefix written, `max_tokens` of output; input
        tokens raised by the margin count_tokens last measured (when the local estimate fell short)."""
        return self.fixed + self._scaled(message_tokens) * self.input

    def estimate(self, documents: int, message_tokens: int, batches: int, system: int | None = None) -> int:
        """Documents of this task as `etl estimate` prices them: one cache write per batch. `system`: the
        system prompt's tokens when measured (count_tokens scales it as it scales the messages)."""
        if not documents:
            return 0
        system = self.system_tokens if system is None else system
        units = message_tokens * self.input + documents * self.max_output
        if self.cached:
            writes = min(batches, documents)
            units += system * (writes * self.write + (documents - writes) * self.read)
        else:
            units += documents * system * self.input
        return units

    def input_tokens(self, documents: int, message_tokens: int, system: int | None = None) -> int:
        """Input tokens of these documents outside the cache (all of them without caching)."""
        system = self.system_tokens if system is None else system
        return message_tokens + (0 if self.cached else documents * system)


class Costing:
    """Every configured task's `TaskCost` at one common scale, and conversions to USD."""

    def __init__(self, config: Config, margin: tuple[int, int] = (1, 1)) -> None:
        meter = Meter(config.pricing)
        rates = {name: meter.rates(t.model) for name, t in config.tasks.items()}
        known = [r for r in rates.values() if r is not None]
        self.scale = max([r.scale + r.discount_scale for r in known], default=0)
        self.tasks = {
            name: TaskCost(config.tasks[name], r, self.scale, margin)
            for name, r in rates.items()
            if r is not None
        }

    def usd(self, units: int) -> Decimal:
        return to_money(Decimal(units).scaleb(-self.scale))

    def units(self, usd: Decimal) -> int:
        """A cap in units, rounded down (a cap is never loosened by rounding)."""
        return int(usd.scaleb(self.scale).to_integral_value(rounding=ROUND_FLOOR))

    def standard(self, units: int, discount: Decimal) -> Decimal:
        """The standard price of batch-price units."""
        return to_money(Decimal(units).scaleb(-self.scale) / discount)


def margin(calibration: str | None) -> tuple[int, int]:
    """The upper bound's input margin from the stored calibration: count_tokens / local estimate, rounded
    up to a thousandth, when the local estimate fell short; 1 otherwise (never below the local estimate)."""
    if not calibration:
        return (1, 1)
    try:
        ratio = Decimal(str(json.loads(calibration)["ratio"]))
    except (ValueError, KeyError, TypeError, ArithmeticError):
        return (1, 1)
    if not ratio.is_finite() or ratio <= 1:
        return (1, 1)
    return (int((ratio * 1000).to_integral_value(rounding=ROUND_CEILING)), 1000)


def caps(config: Config) -> dict[str, Decimal]:
    """The configured caps: `ALL` for `[submit] max_cost_usd_per_night`, then each task's own."""
    out: dict[str, Decimal] = {}
    if config.submit.max_cost_usd_per_night > 0:
        out[ALL] = config.submit.max_cost_usd_per_night
    for name, task in sorted(config.tasks.items()):  # tasks by name, everywhere (etl.costs.by_task)
        if task.max_cost_usd_per_night is not None:
            out[name] = task.max_cost_usd_per_night
    return out


@dataclass
class Allowance:
    """What is left of tonight's caps, in units, taken document by document (nothing when uncapped)."""

    costing: Costing
    caps: dict[str, Decimal]
    spent: dict[str, Decimal]  # per task, reserved tonight already
    left: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        spent_units = {t: self.costing.units(v) for t, v in self.spent.items()}
        self.left = {}
        for key, cap in self.caps.items():
            used = sum(spent_units.values()) if key == ALL else spent_units.get(key, 0)
            self.left[key] = self.costing.units(cap) - used

    @property
    def capped(self) -> bool:
        return bool(self.caps)

    def take(self, task: str, units: int) -> bool:
        """Count a document of `units` against the caps if it fits under all of them."""
        if not self.left:
            return True
        total = self.left.get(ALL)
        own = self.left.get(task)
        if (total is not None and units > total) or (own is not None and units > own):
            return False
        if total is not None:
            self.left[ALL] = total - units
        if own is not None:
            self.left[task] = own - units
        return True

    def exhausted(self, task: str) -> bool:
        return self.left.get(ALL, 1) <= 0 or self.left.get(task, 1) <= 0


def fits(caps: dict[str, Decimal], spent: dict[str, Decimal], shares: list[Reservation]) -> bool:
    """Whether reserving `shares` on top of `spent` keeps every cap: the check made under the budget lock,
    in exact Decimals, right before a batch is sent."""
    after = dict(spent)
    for share in shares:
        after[share.task] = after.get(share.task, Decimal(0)) + share.reserved_usd
    for key, cap in caps.items():
        used = sum(after.values(), Decimal(0)) if key == ALL else after.get(key, Decimal(0))
        if used > cap:
            return False
    return True


def waiting_reason(night: str, caps: dict[str, Decimal], task: str) -> str:
    which = (
        f"task {task!r}'s cap of ${caps[task]}"
        if task in caps and (ALL not in caps or caps[task] < caps[ALL])
        else f"the cap of ${caps.get(ALL, caps.get(task))}"
    )
    return (
        f"{BUDGET_REASON}: sending it would cross {which} for the night of {night}; it goes on a later night"
    )
