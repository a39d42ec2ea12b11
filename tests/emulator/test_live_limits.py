"""POST /v1/messages as the live path sees it: latency that blocks no one, rate limits answered like the
API (429, retry-after, anthropic-ratelimit-*), 529 bursts, and billing apart from batches at the
standard rate. Through the real SDK."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
from typing import Any

import anthropic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.emulator import EmulatorControl, EmulatorServer
from etl.emulator.clock import parse_time
from etl.emulator.limits import LiveSettings, standard_cost
from tests.emulator.conftest import request


def params(i: int) -> dict[str, Any]:
    body: dict[str, Any] = request(f"m{i}", f"Live document number {i} about crates")["params"]
    return body


def test_latency_is_slept_per_request_so_slow_answers_do_not_queue_behind_each_other(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    """Three requests with a 30 s latency are all received and billed while the first still waits:
    the server answers each on its own thread, outside the state lock."""
    control.set_live(latency_seconds=30)

    def call(i: int) -> None:
        # The emulator stops under these sleeping calls when the test ends: their broken connection is
        # expected then, and must not surface as an unhandled thread exception in a later test.
        with contextlib.suppress(anthropic.APIError):
            client.messages.create(**params(i))

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while control.ledger()["live"]["calls"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert control.ledger()["live"]["calls"] == 3
    assert all(t.is_alive() for t in threads)  # none has been answered yet
    control.set_live()  # later requests answer at once; the three sleeping threads are daemons


def test_requests_per_minute_answers_429_with_retry_after_and_the_ratelimit_headers(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    control.set_live(requests_per_minute=2)
    first = client.messages.with_raw_response.create(**params(1))
    assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
    client.messages.create(**params(2))
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(**params(3))
    headers = caught.value.response.headers
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = parse_time(headers["anthropic-ratelimit-requests-reset"])
    assert 0 < (reset - control.now()).total_seconds() <= 60
    ledger = control.ledger()["live"]
    assert (ledger["calls"], ledger["rate_limited"]) == (2, 1)  # the refused call cost nothing
    control.advance(60)
    client.messages.create(**params(3))
    assert control.ledger()["live"]["calls"] == 3


def test_tokens_per_minute_limits_after_the_window_fills(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    control.set_live(tokens_per_minute=10)
    answer = client.messages.with_raw_response.create(**params(1))
    assert answer.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(**params(2))
    assert caught.value.response.headers["anthropic-ratelimit-tokens-limit"] == "10"
    assert "tokens per minute" in caught.value.message
    control.advance(61)
    client.messages.create(**params(2))


def test_a_529_burst_then_answers_and_bills_only_the_answer(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    control.set_faults([{"endpoint": "messages", "action": "status", "status": 529, "times": 3}])
    for _ in range(3):
        with pytest.raises(anthropic.InternalServerError) as caught:
            client.messages.create(**params(1))
        assert caught.value.status_code == 529 and caught.value.response.headers["retry-after"]
    client.messages.create(**params(1))
    assert control.ledger()["live"]["calls"] == 1


def test_live_calls_are_billed_apart_from_batches_at_the_standard_rate(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    one = client.messages.create(**params(1))
    two = client.messages.create(**params(1))  # the same document again: billed twice, one key
    ledger = control.ledger()
    assert ledger["requests_created"] == 0 and ledger["input_tokens"] == 0
    live = ledger["live"]
    assert list(live["billed"].values()) == [2]
    usage = one.usage.model_dump()
    expected = standard_cost(one.model, usage) + standard_cost(two.model, two.usage.model_dump())
    assert live["standard_cost_usd"] == pytest.approx(expected)
    # haiku 4.5: $1 in / $5 out per million tokens
    assert standard_cost(one.model, usage) == pytest.approx(
        (usage["input_tokens"] * 1.0 + usage["output_tokens"] * 5.0) / 1e6
    )


@settings(max_examples=30, deadline=None)
@given(latency=st.floats(min_value=0, max_value=5), jitter=st.floats(min_value=0, max_value=5))
def test_each_delay_is_the_latency_plus_at_most_the_jitter(latency: float, jitter: float) -> None:
    from etl.emulator.limits import Limits

    limits = Limits(LiveSettings(latency_seconds=latency, jitter_seconds=jitter), seed=3)
    for _ in range(5):
        assert latency <= limits.delay() <= latency + jitter


def test_bad_live_settings_are_refused_with_the_reason(emulator: EmulatorServer) -> None:
    control = EmulatorControl(emulator.base_url)
    for bad in ({"latency_seconds": -1}, {"requests_per_minute": "many"}, {"speed": 3}):
        with pytest.raises(urllib.error.HTTPError) as caught:
            control._call("POST", "live", bad)
        assert caught.value.code == 400
    assert control.set_live(latency_seconds=0.5)["latency_seconds"] == 0.5
