"""Cost of a result in the Batches API and at standard prices."""

from __future__ import annotations

from etl.config import DEFAULT_PRICES, Pricing
from etl.pricing import Meter, Usage, costs

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
    assert abs(standard - 3.0 * 6.25) < 1e-9


def test_unknown_model_costs_nothing_rather_than_guessing() -> None:
    assert costs(PRICING, "mystery-model", Usage(input_tokens=5)) == (0.0, 0.0)


def test_the_meter_prices_exactly_as_costs_does() -> None:
    meter = Meter(PRICING)
    for model in ["claude-haiku-4-5-20251001", "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "mystery"]:
        usage = Usage(
            input_tokens=1234, output_tokens=567, cache_write_5m=89, cache_write_1h=10, cache_read=11
        )
        assert meter.costs(model, usage) == costs(PRICING, model, usage)
