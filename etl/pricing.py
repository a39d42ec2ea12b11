"""What a result cost in the Batches API, and what the same tokens would cost at standard prices.

Money is `Decimal`, exact: configured prices are read as written (`0.8` is 0.8), and a result's cost is
computed in integers (`Rates`: per-token prices scaled by a power of ten that makes every one of them an
integer) and turned into a Decimal once, rounded to the stored precision (`schema.MONEY_UNIT`). Summing
stored costs therefore gives exactly the reported totals.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NamedTuple

from etl.config import ModelPrice, Pricing
from etl.store.schema import MONEY_SCALE, MONEY_UNIT, MoneyUnits

MILLION = 1_000_000
ZERO = Decimal(0).quantize(MONEY_UNIT)


class Usage(NamedTuple):
    """Token counts of one result (a tuple: the collector makes one per result line)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0

    @property
    def cache_write(self) -> int:
        return self.cache_write_5m + self.cache_write_1h

    @classmethod
    def from_api(cls, usage: Mapping[str, Any]) -> Usage:
        writes = int(usage.get("cache_creation_input_tokens") or 0)
        detail = usage.get("cache_creation") or {}
        w1h = int(detail.get("ephemeral_1h_input_tokens") or 0)
        w5m = int(detail.get("ephemeral_5m_input_tokens") or 0)
        if w1h + w5m != writes:  # no breakdown: price writes at the 5-minute rate
            w5m, w1h = writes, 0
        return cls(
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            cache_write_5m=w5m,
            cache_write_1h=w1h,
            cache_read=int(usage.get("cache_read_input_tokens") or 0),
        )


def _exponent(values: list[Decimal]) -> int:
    """The smallest k >= 0 with every value * 10**k an integer."""
    k = 0
    for v in values:
        exp = v.normalize().as_tuple().exponent
        if isinstance(exp, int):
            k = max(k, -exp)
    return k


class Rates:
    """One model's per-token prices (standard and batch) as integers of 10**-scale USD.

    `units(usage)` is a handful of integer multiplications, so pricing a result (or estimating a
    document, `etl.estimate`) costs no Decimal arithmetic until `usd(units)`.
    """

    __slots__ = ("discount", "discount_scale", "input", "output", "read", "scale", "write_1h", "write_5m")

    def __init__(self, pricing: Pricing, price: ModelPrice) -> None:
        per_token = [
            price.input / MILLION,
            price.output / MILLION,
            price.input * pricing.cache_write_5m / MILLION,
            price.input * pricing.cache_write_1h / MILLION,
            price.input * pricing.cache_read / MILLION,
        ]
        self.scale = _exponent(per_token)
        self.input, self.output, self.write_5m, self.write_1h, self.read = (
            int(v.scaleb(self.scale)) for v in per_token
        )
        self.discount_scale = _exponent([pricing.batch_discount])
        self.discount = int(pricing.batch_discount.scaleb(self.discount_scale))

    def units(self, usage: Usage) -> int:
        """The standard price of `usage`, in 10**-scale USD."""
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_write_5m * self.write_5m
            + usage.cache_write_1h * self.write_1h
            + usage.cache_read * self.read
        )

    def money(self, units: int) -> tuple[MoneyUnits, MoneyUnits]:
        """(batch cost, standard cost) of standard-price `units` in `MONEY_UNIT`, rounded half-even: the
        one rounding rule of money (`usd` and `batch_usd` are these as Decimal), in integers only."""
        return (
            MoneyUnits(_rescale(units * self.discount, self.scale + self.discount_scale)),
            MoneyUnits(_rescale(units, self.scale)),
        )

    def usd(self, units: int) -> Decimal:
        """Standard-price units as USD money."""
        return MoneyUnits(_rescale(units, self.scale)).usd()

    def batch_usd(self, units: int) -> Decimal:
        """Standard-price units at the batch discount, as USD money."""
        return MoneyUnits(_rescale(units * self.discount, self.scale + self.discount_scale)).usd()


def _rescale(n: int, scale: int) -> int:
    """`n` 10**-scale USD as a whole number of `MONEY_UNIT`, rounded half-even (as `to_money`). Every
    price etl computes is rounded here, once (tests/unit/test_pricing.py holds it to exact fractions)."""
    if scale <= MONEY_SCALE:
        return n * int(10 ** (MONEY_SCALE - scale))
    step = int(10 ** (scale - MONEY_SCALE))
    q, r = divmod(n, step)
    return q + 1 if 2 * r > step or (2 * r == step and q % 2) else q


NO_MONEY = (MoneyUnits(0), MoneyUnits(0))


def costs(pricing: Pricing, model: str, usage: Usage) -> tuple[Decimal, Decimal]:
    """(batch cost, standard cost) in USD; zeros for a model without a price (logged by the caller)."""
    return Meter(pricing).costs(model, usage)


class Meter:
    """Prices many results against one `Pricing`, resolving each model's price once.

    The collector prices every result line; looking the model up by prefix each time was a tenth of its
    per-result work (bench/RESULTS.md).
    """

    def __init__(self, pricing: Pricing) -> None:
        self.pricing = pricing
        self._rates: dict[str, Rates | None] = {}

    def rates(self, model: str) -> Rates | None:
        try:
            return self._rates[model]
        except KeyError:
            price = self.pricing.for_model(model)
            rates = self._rates[model] = None if price is None else Rates(self.pricing, price)
            return rates

    def costs(self, model: str, usage: Usage) -> tuple[Decimal, Decimal]:
        """(batch cost, standard cost) in USD; zeros for a model without a price."""
        rates = self.rates(model)
        if rates is None:
            return ZERO, ZERO
        units = rates.units(usage)
        return rates.batch_usd(units), rates.usd(units)

    def money(self, model: str, usage: Usage) -> tuple[MoneyUnits, MoneyUnits]:
        """`costs` as `MoneyUnits`: the collector's per-result pricing, no Decimal made."""
        rates = self.rates(model)
        if rates is None:
            return NO_MONEY
        return rates.money(rates.units(usage))
