"""Fault injection and the SDK's own retry behaviour against it."""

from __future__ import annotations

import json
from collections.abc import Callable

import anthropic
import httpx2
import pytest
from anthropic.types.shared import EnforcedSpendLimitReachedError

from etl.emulator import EmulatorControl, EmulatorServer
from tests.emulator.conftest import request

FAST_RETRY = {"max_retries": 2}


@pytest.mark.parametrize(
    ("status", "error"), [(500, anthropic.InternalServerError), (529, anthropic.OverloadedError)]
)
def test_status_fault_gives_the_api_error(
    client: anthropic.Anthropic, control: EmulatorControl, status: int, error: type[Exception]
) -> None:
    control.set_faults(rules=[{"endpoint": "list", "action": "status", "status": status, "times": 1}])
    with pytest.raises(error) as info:
        client.messages.batches.list()
    assert isinstance(info.value, anthropic.APIStatusError)
    assert info.value.body["error"]["type"] == {500: "api_error", 529: "overloaded_error"}[status]  # type: ignore[index]
    assert client.messages.batches.list().data == [], "times: 1 fires once"


def test_429_with_retry_after_is_retried_by_the_sdk(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    control.set_faults(
        rules=[{"endpoint": "list", "action": "status", "status": 429, "retry_after": 0.05, "times": 2}]
    )
    client = make_client(max_retries=2)
    response = client.messages.batches.with_raw_response.list()
    assert response.retries_taken == 2


def test_429_carries_retry_after_header(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    control.set_faults(rules=[{"endpoint": "*", "action": "status", "status": 429, "retry_after": 7}])
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.batches.list()
    assert info.value.response.headers["retry-after"] == "7"


def test_spend_limit_is_not_retried(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    control.set_faults(rules=[{"endpoint": "create", "action": "spend_limit"}])
    client = make_client(max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.batches.create(requests=[request("a")])
    assert isinstance(info.value, EnforcedSpendLimitReachedError)
    assert info.value.error_code == "enforced_spend_limit_reached"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert control.ledger()["batches_created"] == 0


def test_reset_is_a_connection_error_retried_by_default(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    control.set_faults(rules=[{"endpoint": "retrieve", "action": "reset", "times": 1}])
    with pytest.raises(anthropic.APIConnectionError):
        make_client().messages.batches.retrieve("msgbatch_x")
    control.set_faults(rules=[{"endpoint": "list", "action": "reset", "times": 1}])
    assert make_client(max_retries=1).messages.batches.with_raw_response.list().retries_taken == 1


def test_ambiguous_create_with_retries_makes_extra_batches(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    control.set_faults(
        rules=[{"endpoint": "create", "action": "ambiguous", "delay_seconds": 0.8, "times": 1}]
    )
    client = make_client(max_retries=2, timeout=0.4)
    batch = client.messages.batches.create(requests=[request("a"), request("b")])
    ledger = control.ledger()
    assert ledger["batches_created"] == 2, "the timed-out attempt created a batch too"
    assert ledger["requests_created"] == 4
    assert len(client.messages.batches.list().data) == 2
    assert batch.id == client.messages.batches.list().data[0].id


def test_ambiguous_create_without_retries_makes_one_batch(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    control.set_faults(rules=[{"endpoint": "create", "action": "ambiguous", "drop": True, "times": 1}])
    client = make_client(max_retries=0)
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.batches.create(requests=[request("a")])
    assert control.ledger()["batches_created"] == 1
    assert len(client.messages.batches.list().data) == 1


def test_transient_not_found_for_a_new_batchs_first_retrieves(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    control.set_faults(rules=[{"endpoint": "retrieve", "action": "not_found", "first_retrieves": 2}])
    batch = client.messages.batches.create(requests=[request("a")])
    for _ in range(2):
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(batch.id)
    assert client.messages.batches.retrieve(batch.id).id == batch.id


def test_list_delay_hides_fresh_batches(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    control.set_faults(list_delay_seconds=30)
    batch = client.messages.batches.create(requests=[request("a")])
    assert client.messages.batches.list().data == []
    control.advance(30)
    assert [b.id for b in client.messages.batches.list()] == [batch.id]


def ended_batch(client: anthropic.Anthropic, control: EmulatorControl, n: int = 10) -> str:
    batch = client.messages.batches.create(requests=[request(f"r{i}") for i in range(n)])
    control.advance(3)
    return batch.id


def test_truncated_stream_ends_early_without_error(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch_id = ended_batch(client, control)
    control.set_faults(rules=[{"endpoint": "results", "action": "truncate", "after_lines": 4, "times": 1}])
    assert len(list(client.messages.batches.results(batch_id))) == 4
    assert len(list(client.messages.batches.results(batch_id))) == 10


def test_cut_line_gives_a_json_error(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    batch_id = ended_batch(client, control)
    control.set_faults(rules=[{"endpoint": "results", "action": "cut_line", "after_lines": 3}])
    with pytest.raises(json.JSONDecodeError):
        list(client.messages.batches.results(batch_id))


# A body that breaks while the SDK reads it: anthropic up to 2.16 lets the transport's own error through,
# 2.17 wraps it in APIConnectionError/APITimeoutError. Either is a failure, never a clean end of the
# stream; what the daemon relies on is the seam's ResultsIncomplete (tests/unit/test_provider_seam.py).
SDK_READ_FAILURES = (httpx2.TransportError, anthropic.APIConnectionError)


def wire_results(emulator: EmulatorServer, batch_id: str, read_timeout: float = 5.0) -> bytes:
    """The results body read by the transport alone, no SDK: the emulator's faults as they are on the wire."""
    timeout = httpx2.Timeout(read_timeout, connect=5.0)
    with (
        httpx2.Client(base_url=emulator.base_url, timeout=timeout) as http,
        http.stream(
            "GET",
            f"/v1/messages/batches/{batch_id}/results",
            headers={"x-api-key": "test-key", "anthropic-version": "2023-06-01"},
        ) as response,
    ):
        return b"".join(response.iter_bytes())


def test_stream_reset_is_a_protocol_error_on_the_wire(
    emulator: EmulatorServer, client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch_id = ended_batch(client, control)
    control.set_faults(rules=[{"endpoint": "results", "action": "stream_reset", "after_lines": 3}])
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        wire_results(emulator, batch_id)
    with pytest.raises(SDK_READ_FAILURES):
        list(client.messages.batches.results(batch_id))


def test_stall_is_a_read_timeout_on_the_wire(
    emulator: EmulatorServer, make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    client = make_client(timeout=0.3)
    batch_id = ended_batch(client, control)
    control.set_faults(
        rules=[{"endpoint": "results", "action": "stall", "after_lines": 3, "stall_seconds": 1}]
    )
    with pytest.raises(httpx2.ReadTimeout):
        wire_results(emulator, batch_id, read_timeout=0.3)
    with pytest.raises((httpx2.ReadTimeout, anthropic.APITimeoutError)):
        list(client.messages.batches.results(batch_id))


def test_outcome_rules_force_result_types(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    control.set_faults(
        outcomes=[
            {
                "custom_id": "r[0-2]",
                "outcome": "errored",
                "error_type": "overloaded_error",
                "message": "busy",
            },
            {"custom_id": "r3", "outcome": "expired"},
            {"custom_id": "r4", "outcome": "canceled"},
            {"custom_id": "r.*", "outcome": "succeeded"},
        ]
    )
    batch_id = ended_batch(client, control)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch_id)}
    for custom_id in ("r0", "r1", "r2"):
        result = results[custom_id]
        assert result.type == "errored"
        assert (result.error.error.type, result.error.error.message) == ("overloaded_error", "busy")
    assert results["r3"].type == "expired" and results["r4"].type == "canceled"
    assert {results[f"r{i}"].type for i in range(5, 10)} == {"succeeded"}
    counts = client.messages.batches.retrieve(batch_id).request_counts
    assert (counts.errored, counts.expired, counts.canceled, counts.succeeded) == (3, 1, 1, 5)
    assert sorted(control.ledger()["billed"]) == [f"r{i}" for i in range(5, 10)]


def test_rate_outcomes_are_reproducible_for_a_seed(make_emulator: Callable[..., EmulatorServer]) -> None:
    def errored_ids(seed: int) -> set[str]:
        server = make_emulator(processing_seconds=0, seed=seed)
        EmulatorControl(server.base_url).set_faults(
            outcomes=[{"custom_id": ".*", "outcome": "errored", "error_type": "api_error", "rate": 0.3}]
        )
        client = anthropic.Anthropic(base_url=server.base_url, api_key="k", _strict_response_validation=True)
        batch = client.messages.batches.create(requests=[request(f"r{i}") for i in range(200)])
        return {r.custom_id for r in client.messages.batches.results(batch.id) if r.result.type == "errored"}

    first = errored_ids(1)
    assert 30 < len(first) < 90
    assert errored_ids(1) == first
    assert errored_ids(2) != first


def test_fault_endpoints_read_append_and_clear(control: EmulatorControl) -> None:
    control.set_faults(rules=[{"endpoint": "list", "action": "status", "status": 500, "times": 1}])
    control.set_faults(rules=[{"endpoint": "create", "action": "reset"}], mode="append")
    faults = control.faults()
    assert [r["endpoint"] for r in faults["rules"]] == ["list", "create"]
    assert faults["rules"][0]["remaining"] == 1
    control.clear_faults()
    assert control.faults()["rules"] == []


def test_bad_fault_documents_are_rejected(control: EmulatorControl) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as info:
        control.set_faults(rules=[{"endpoint": "create", "action": "explode"}])
    assert info.value.code == 400


def test_faults_from_config_apply_at_start(make_emulator: Callable[..., EmulatorServer]) -> None:
    server = make_emulator(faults={"rules": [{"endpoint": "list", "action": "status", "status": 503}]})
    client = anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.InternalServerError):
        client.messages.batches.list()


def _raw_results(client: anthropic.Anthropic, batch_id: str) -> bytes:
    """Every byte of the results body the SDK received before the stream ended or broke (re-raised)."""
    got = b""
    with client.messages.batches.with_streaming_response.results(batch_id) as response:
        try:
            for chunk in response.iter_bytes():
                got += chunk
        except SDK_READ_FAILURES as exc:
            raise BrokenStream(got) from exc
    return got


class BrokenStream(Exception):
    def __init__(self, received: bytes) -> None:
        super().__init__(f"broke after {len(received)} bytes")
        self.received = received


def test_break_at_sends_exactly_that_many_bytes_then_resets(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    """Every offset from the first byte (0: headers only) to past the end: the client gets exactly the
    body's first `at_byte` bytes and a connection error, never a clean end."""
    client = make_client(max_retries=0)
    batch_id = ended_batch(client, control, n=3)
    full = _raw_results(client, batch_id)
    offsets = sorted({0, 1, 2, len(full) // 3, len(full) // 2, len(full) - 1, len(full), len(full) + 50})
    for at in offsets:
        control.set_faults(rules=[{"endpoint": "results", "action": "break_at", "at_byte": at, "times": 1}])
        with pytest.raises(BrokenStream) as info:
            _raw_results(client, batch_id)
        assert info.value.received == full[:at], at
    assert _raw_results(client, batch_id) == full, "times: 1 fires once"


def test_break_at_zero_fails_the_first_line_read_too(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    """The SDK's decoded results iterator (the path of a first-result read) also fails at byte 0: it
    raises (the transport's error or the SDK's wrapping of it), it does not end as if there were none."""
    client = make_client(max_retries=0)
    batch_id = ended_batch(client, control, n=2)
    control.set_faults(rules=[{"endpoint": "results", "action": "break_at", "at_byte": 0, "times": 1}])
    with pytest.raises(SDK_READ_FAILURES):
        next(iter(client.messages.batches.results(batch_id)))


def test_clock_offset_shifts_every_api_timestamp_and_the_date_header(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    from datetime import timedelta
    from email.utils import parsedate_to_datetime

    batch = client.messages.batches.create(requests=[request("a")])
    control.advance(3)
    before = client.messages.batches.retrieve(batch.id)
    for offset in (-1200.0, 600.0, -3 * 86400.0):
        control.set_faults(clock_offset_seconds=offset)
        shifted = client.messages.batches.with_raw_response.retrieve(batch.id)
        after = shifted.parse()
        delta = timedelta(seconds=offset)
        assert after.created_at == before.created_at + delta
        assert after.ended_at == (before.ended_at and before.ended_at + delta)
        assert after.expires_at == before.expires_at + delta
        assert [b.created_at for b in client.messages.batches.list()] == [before.created_at + delta]
        date = parsedate_to_datetime(shifted.headers["date"])
        assert abs((date - (control.now() + delta)).total_seconds()) < 5
        assert after.processing_status == "ended", "the offset moves the API's clock, not the batch's life"
    assert control.faults()["clock_offset_seconds"] == -3 * 86400.0
    control.set_faults()
    assert client.messages.batches.retrieve(batch.id).created_at == before.created_at, "replace resets it"


def test_bad_clock_offset_is_rejected(control: EmulatorControl) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as info:
        control.set_faults(clock_offset_seconds="soon")  # type: ignore[arg-type]
    assert info.value.code == 400


def test_every_rule_counts_its_hits(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    """A rule that matches nothing shows 0 hits: a test can prove the fault it installed was served."""
    control.set_faults(
        rules=[
            {"endpoint": "list", "action": "status", "status": 500, "times": 1},
            {"endpoint": "cancel", "action": "reset"},
        ],
        outcomes=[
            {"custom_id": "r[0-2]", "outcome": "errored"},
            {"custom_id": "r1", "outcome": "expired"},  # r1 is r[0-2]'s: the first match fires
            {"custom_id": "q1", "outcome": "expired"},  # nobody's id
        ],
    )
    with pytest.raises(anthropic.InternalServerError):
        client.messages.batches.list()
    client.messages.batches.list()
    ended_batch(client, control)
    faults = control.faults()
    assert [r["hits"] for r in faults["rules"]] == [1, 0]
    assert [o["hits"] for o in faults["outcomes"]] == [3, 0, 0]
    control.set_faults(outcomes=[{"custom_id": "r.*", "outcome": "succeeded"}], mode="append")
    assert [o["hits"] for o in control.faults()["outcomes"]] == [3, 0, 0, 0]  # append keeps the counts
    control.set_faults()
    assert control.faults()["outcomes"] == []
