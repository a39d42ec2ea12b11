"""What a result cost in the Batches API, and what the same tokens would cost at standard prices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from etl.config import ModelPrice, Pricing

MILLION = 1_000_000


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


def _standard(pricing: Pricing, price: ModelPrice, usage: Usage) -> float:
    inp = (
        usage.input_tokens
        + usage.cache_write_5m * pricing.cache_write_5m
        + usage.cache_write_1h * pricing.cache_write_1h
        + usage.cache_read * pricing.cache_read
    ) * price.input
    return (inp + usage.output_tokens * price.output) / MILLION


def costs(pricing: Pricing, model: str, usage: Usage) -> tuple[float, float]:
    """(batch cost, standard cost) in USD; zeros for a model without a price (logged by the caller)."""
    return Meter(pricing).costs(model, usage)


class Meter:
    """Prices many results against one `Pricing`, resolving each model's price once.

    The collector prices every result line; looking the model up by prefix each time was a tenth of its
    per-result work (bench/RESULTS.md).
    """

    def __init__(self, pricing: Pricing) -> None:
        self.pricing = pricing
        self._prices: dict[str, ModelPrice | None] = {}

    def costs(self, model: str, usage: Usage) -> tuple[float, float]:
        """(batch cost, standard cost) in USD; zeros for a model without a price."""
        try:
            price = self._prices[model]
        except KeyError:
            price = self._prices[model] = self.pricing.for_model(model)
        if price is None:
            return 0.0, 0.0
        standard = _standard(self.pricing, price, usage)
        return standard * self.pricing.batch_discount, standard
