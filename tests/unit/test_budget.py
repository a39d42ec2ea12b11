"""The nightly budget's arithmetic: nights, per-document upper bounds, and the cap check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from etl import budget, config
from etl.store.spend import Reservation

ROOT = Path(__file__).resolve().parents[2]
CFG = config.load({}, ROOT / "config" / "etl.toml")
ZONES = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Pacific/Auckland"])


@settings(deadline=None)  # the first zoneinfo load is slow on a busy machine
@given(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)),
    ZONES,
)
def test_every_moment_belongs_to_the_night_that_began_at_the_last_local_noon(
    now: datetime, zone: str
) -> None:
    tz = ZoneInfo(zone)
    start = budget.night_start(now, tz)
    assert start <= now < start + timedelta(hours=26)  # 23 to 25 hours across a DST change
    assert start.astimezone(tz).hour == 12
    assert budget.night_of(start, tz) == budget.night_of(now, tz)
    assert budget.night_of(start - timedelta(seconds=1), tz) != budget.night_of(now, tz)


def share(task: str, usd: str) -> Reservation:
    return Reservation(task, "m", 1, 1, 1, Decimal(usd), Decimal(usd))


def test_fits_allows_the_cap_exactly_and_not_a_unit_more() -> None:
    caps = {budget.ALL: Decimal("2"), "classify": Decimal("0.5")}
    spent = {"default": Decimal("1.2"), "classify": Decimal("0.3")}
    assert budget.fits(caps, spent, [share("default", "0.3"), share("classify", "0.2")])
    assert not budget.fits(caps, spent, [share("default", "0.3000000001"), share("classify", "0.2")])
    assert not budget.fits(caps, spent, [share("classify", "0.2000000001")])


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=40), st.integers(0, 10**6))
def test_the_allowance_takes_documents_while_their_upper_bounds_fit(
    tokens: list[int], cap_units: int
) -> None:
    costing = budget.Costing(CFG)
    cap = costing.usd(cap_units * 1000)
    allowance = budget.Allowance(costing, {budget.ALL: cap}, {})
    cost = costing.tasks["default"]
    taken = [t for t in tokens if allowance.take("default", cost.upper_bound(t))]
    total = sum(cost.upper_bound(t) for t in taken)
    assert costing.usd(total) <= cap
    refused = [t for t in tokens if t not in taken]
    # everything refused would have crossed the cap on top of what was taken before it
    assert all(cost.upper_bound(t) > costing.units(cap) - total for t in refused) or not refused


def test_a_cached_task_reserves_a_write_per_document_and_estimates_one_per_batch() -> None:
    costing = budget.Costing(CFG)
    cost = costing.tasks["default"]  # the shipped default caches its system prompt
    assert cost.cached
    ten = cost.estimate(10, 1000, batches=1)
    assert ten < sum(cost.upper_bound(100) for _ in range(10))
    assert cost.estimate(10, 1000, batches=10) == sum(cost.upper_bound(100) for _ in range(10))


def test_the_margin_only_ever_raises_the_upper_bound() -> None:
    assert budget.margin(None) == (1, 1)
    assert budget.margin('{"ratio": 0.9}') == (1, 1)  # the local estimate was high: keep it
    assert budget.margin('{"ratio": 1.2341}') == (1235, 1000)  # rounded up
    assert budget.margin('{"local_error": -0.1}') == (1, 1)  # saved before the ratio was: none known
    assert budget.margin("not json") == (1, 1)
    cost = budget.Costing(CFG, (1235, 1000)).tasks["default"]
    plain = budget.Costing(CFG).tasks["default"]
    assert cost.upper_bound(1000) > plain.upper_bound(1000)
