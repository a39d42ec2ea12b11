"""The batch lifecycle on the virtual clock: processing, expiry, archive, counts, persistence."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import anthropic
import pytest

from etl.emulator import EmulatorControl, EmulatorServer
from tests.emulator.conftest import request


def client_for(server: EmulatorServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.base_url, api_key="test-key", max_retries=0, _strict_response_validation=True
    )


def test_clock_reads_and_advances(control: EmulatorControl) -> None:
    before = control.now()
    after = control.advance(3600)
    assert timedelta(seconds=3600) <= after - before < timedelta(seconds=3610)


def test_zero_processing_seconds_ends_at_once(make_emulator: Callable[..., EmulatorServer]) -> None:
    client = client_for(make_emulator(processing_seconds=0))
    batch = client.messages.batches.create(requests=[request("a")])
    assert batch.processing_status == "ended" and batch.request_counts.succeeded == 1
    assert batch.ended_at == batch.created_at


def test_counts_always_sum_to_the_request_count(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch = client.messages.batches.create(requests=[request(f"r{i}") for i in range(7)])
    for _ in range(3):
        counts = client.messages.batches.retrieve(batch.id).request_counts
        assert sum(counts.model_dump().values()) == 7
        control.advance(2)


def test_unprocessed_requests_expire_after_24_hours(make_emulator: Callable[..., EmulatorServer]) -> None:
    server = make_emulator(processing_seconds=200_000)
    client, control = client_for(server), EmulatorControl(server.base_url)
    batch = client.messages.batches.create(requests=[request("a"), request("b")])
    control.advance(23 * 3600)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    control.advance(3600)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.ended_at == ended.expires_at
    assert ended.request_counts.expired == 2
    assert {r.result.type for r in client.messages.batches.results(batch.id)} == {"expired"}
    assert control.ledger()["billed"] == {}


def test_results_are_archived_29_days_after_creation(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch = client.messages.batches.create(requests=[request("a")])
    control.advance(29 * 86400 - 60)
    assert len(list(client.messages.batches.results(batch.id))) == 1
    assert client.messages.batches.retrieve(batch.id).archived_at is None
    control.advance(60)
    archived = client.messages.batches.retrieve(batch.id)
    assert archived.archived_at == archived.created_at + timedelta(days=29)
    with pytest.raises(anthropic.NotFoundError):
        list(client.messages.batches.results(batch.id))


def test_billing_happens_once_when_the_batch_ends(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch = client.messages.batches.create(requests=[request("a"), request("b")])
    assert control.ledger()["billed"] == {}
    control.advance(3)
    for _ in range(2):
        list(client.messages.batches.results(batch.id))
    ledger = control.ledger()
    assert ledger["billed"] == {"a": 1, "b": 1}
    assert (ledger["batches_created"], ledger["requests_created"]) == (1, 2)
    usage = [r.result.message.usage for r in client.messages.batches.results(batch.id)]  # type: ignore[union-attr]
    assert ledger["input_tokens"] == sum(u.input_tokens for u in usage)
    assert ledger["output_tokens"] == sum(u.output_tokens for u in usage)


def test_ledger_reads_settle_due_batches(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    client.messages.batches.create(requests=[request("a")])
    control.advance(3)
    assert control.ledger()["billed"] == {"a": 1}


def test_reset_clears_everything(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    client.messages.batches.create(requests=[request("a")])
    control.set_faults(rules=[{"endpoint": "list", "action": "status", "status": 500}])
    before = control.advance(86400)
    control.reset()
    assert control.now() < before
    assert client.messages.batches.list().data == []
    assert control.ledger()["batches_created"] == 0
    assert control.faults()["rules"] == []


def test_state_file_survives_a_restart(make_emulator: Callable[..., EmulatorServer], tmp_path: Path) -> None:
    state_file = tmp_path / "emulator.json"
    first = make_emulator(state_file=state_file)
    client = client_for(first)
    batch = client.messages.batches.create(requests=[request("a"), request("b")])
    EmulatorControl(first.base_url).advance(3)
    expected = [r.model_dump() for r in client.messages.batches.results(batch.id)]
    first.stop()
    second = make_emulator(state_file=state_file)
    client = client_for(second)
    assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
    got = [r.model_dump() for r in client.messages.batches.results(batch.id)]
    assert got == expected
    assert EmulatorControl(second.base_url).ledger()["billed"] == {"a": 1, "b": 1}
