"""Cost of a result in the Batches API and at standard prices."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from etl import answer
from etl.config import DEFAULT_PRICES, ModelPrice, Pricing, decimal_of
from etl.pricing import Meter, Usage, costs
from etl.store.schema import MONEY_UNIT, MoneyUnits

PRICING = Pricing(models=DEFAULT_PRICES)


def test_batch_cost_is_half_the_standard_cost() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=200_000)
    batch, standard = costs(PRICING, "claude-haiku-4-5-20251001", usage)
    assert standard == 1.0 + 1.0  # $1/M input + $5/M * 0.2M output
    assert batch == standard / 2


def test_cache_writes_and_reads_use_their_multipliers() -> None:
    usage = Usage.from_api(
        {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 3_000_000,
            "cache_read_input_tokens": 10_000_000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 1_000_000,
                "ephemeral_1h_input_tokens": 2_000_000,
            },
        }
    )
    _, standard = costs(PRICING, "claude-sonnet-4-5", usage)
    # sonnet $3/M: 1M * 1.25 + 2M * 2.0 + 10M * 0.1 = 6.25 M-equivalent tokens
    assert standard == Decimal("18.75")


def test_unknown_model_costs_nothing_rather_than_guessing() -> None:
    assert costs(PRICING, "mystery-model", Usage(input_tokens=5)) == (Decimal(0), Decimal(0))


def test_the_meter_prices_exactly_as_costs_does() -> None:
    meter = Meter(PRICING)
    for model in ["claude-haiku-4-5-20251001", "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "mystery"]:
        usage = Usage(
            input_tokens=1234, output_tokens=567, cache_write_5m=89, cache_write_1h=10, cache_read=11
        )
        assert meter.costs(model, usage) == costs(PRICING, model, usage)


PRICES = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100"), places=2)
TOKENS = st.integers(min_value=0, max_value=5_000_000)
FINE_PRICES = st.decimals(min_value=Decimal("0"), max_value=Decimal("100"), places=7)
FACTORS = st.decimals(min_value=Decimal("0"), max_value=Decimal("3"), places=4)


def _rounded(exact: Fraction) -> Fraction:
    """`exact` USD as stored: a whole number of MONEY_UNIT, half to even (`round` of a Fraction)."""
    unit = Fraction(MONEY_UNIT)
    return round(exact / unit) * unit


@settings(deadline=None, max_examples=300)
@given(
    st.one_of(PRICES, FINE_PRICES),
    st.one_of(PRICES, FINE_PRICES),
    st.one_of(st.sampled_from([Decimal("0.5"), Decimal("0.25"), Decimal(1)]), FACTORS),
    FACTORS,
    FACTORS,
    FACTORS,
    TOKENS,
    TOKENS,
    TOKENS,
    TOKENS,
    TOKENS,
)
def test_costs_are_the_exact_price_of_the_tokens_rounded_once(
    inp: Decimal,
    out: Decimal,
    discount: Decimal,
    w5m: Decimal,
    w1h: Decimal,
    read: Decimal,
    i: int,
    o: int,
    w5: int,
    w1: int,
    r: int,
) -> None:
    """Exact arithmetic (as fractions) rounded once to the stored unit, half to even, never a float on
    the way; prices finer than the unit included, so the rounding itself is judged. Every way etl prices
    (`costs`, the collector's `Meter.money`, the estimate's and budget's `Rates.usd`) gives that value."""
    pricing = Pricing(
        models={"m": ModelPrice(inp, out)},
        batch_discount=discount,
        cache_write_5m=w5m,
        cache_write_1h=w1h,
        cache_read=read,
    )
    exact = (
        Fraction(i) * Fraction(inp)
        + Fraction(o) * Fraction(out)
        + Fraction(w5) * Fraction(inp) * Fraction(w5m)
        + Fraction(w1) * Fraction(inp) * Fraction(w1h)
        + Fraction(r) * Fraction(inp) * Fraction(read)
    ) / 1_000_000
    want = (_rounded(exact * Fraction(discount)), _rounded(exact))
    usage = Usage(i, o, w5, w1, r)
    meter = Meter(pricing)
    batch, standard = costs(pricing, "m", usage)
    assert (Fraction(batch), Fraction(standard)) == want
    money = meter.money("m", usage)
    assert type(money[0]) is MoneyUnits and type(money[1]) is MoneyUnits
    assert (Fraction(money[0].usd()), Fraction(money[1].usd())) == want
    rates = meter.rates("m")
    assert rates is not None
    units = rates.units(usage)
    assert (Fraction(rates.batch_usd(units)), Fraction(rates.usd(units))) == want
    assert meter.money("unknown", usage) == (0, 0)


def test_toml_numbers_are_read_as_written() -> None:
    assert decimal_of(0.1) == Decimal("0.1")
    assert decimal_of(0.8) * 3 == Decimal("2.4")
    assert decimal_of(3) == Decimal(3)


def _usage_as_before(value: Any) -> Usage:
    """What `answer._usage` returned before its fast path: the checks, then `Usage.from_api`."""
    detail = value.get("cache_creation")
    if detail is not None and not isinstance(detail, dict):
        value = {**value, "cache_creation": None}
    return Usage.from_api(value)


COUNT = st.one_of(st.none(), st.integers(0, 10**6))
ODD = st.one_of(COUNT, st.integers(-5, 5), st.just(""), st.just("7"), st.just("x"), st.floats(0, 9))


@settings(deadline=None, max_examples=400)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "input_tokens": COUNT,
            "output_tokens": COUNT,
            "cache_creation_input_tokens": COUNT,
            "cache_read_input_tokens": COUNT,
            "cache_creation": st.one_of(
                st.none(),
                st.text(max_size=3),
                st.fixed_dictionaries(
                    {}, optional={"ephemeral_5m_input_tokens": ODD, "ephemeral_1h_input_tokens": ODD}
                ),
            ),
        },
    )
)
def test_reading_usage_fast_gives_what_the_full_read_gives(value: dict[str, Any]) -> None:
    """The collector's usage read skips the cache breakdown when nothing was written to the cache; it must
    give the same counts as the full read, and refuse what the full read refuses."""
    try:
        before: Usage | str = _usage_as_before(value)
    except (TypeError, ValueError):
        before = "refused"
    try:
        after: Usage | str = answer._usage(value)
    except answer.Unreadable:
        after = "refused"
    assert after == before
