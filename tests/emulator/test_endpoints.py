"""Conformance of each endpoint, driven through the real SDK."""

from __future__ import annotations

import re
from collections.abc import Callable

import anthropic
import httpx2
import pytest

from etl.emulator import EmulatorControl, EmulatorServer, model
from tests.emulator.conftest import MODEL, request

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def test_create_returns_an_in_progress_batch(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request("a-1"), request("a-2")])
    assert re.fullmatch(r"msgbatch_[0-9A-Za-z]{24}", batch.id)
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 2
    assert batch.results_url is None and batch.ended_at is None
    assert (batch.expires_at - batch.created_at).total_seconds() == 24 * 3600


def test_batch_ends_after_processing_time_with_results(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch = client.messages.batches.create(requests=[request("a-1"), request("a-2")])
    control.advance(3)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.request_counts.succeeded == 2 and ended.request_counts.processing == 0
    assert ended.ended_at is not None and ended.results_url is not None
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert set(results) == {"a-1", "a-2"}
    for custom_id, result in results.items():
        assert result.type == "succeeded"
        message = result.message
        assert message.model == "claude-haiku-4-5-20251001"
        assert message.usage.service_tier == "batch"
        assert message.stop_reason == "end_turn"
        assert message.content[0].type == "text"
        assert message.content[0].text == model.reply_text(request(custom_id)["params"])
        assert re.fullmatch(r"msg_[0-9A-Za-z]{24}", message.id)


def test_results_url_uses_the_origin_the_client_reached(
    emulator: EmulatorServer, make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    port = emulator.base_url.rsplit(":", 1)[1]
    client = make_client(base_url=f"http://localhost:{port}")
    batch = client.messages.batches.create(requests=[request("a-1")])
    control.advance(3)
    assert client.messages.batches.retrieve(batch.id).results_url == (
        f"http://localhost:{port}/v1/messages/batches/{batch.id}/results"
    )
    assert len(list(client.messages.batches.results(batch.id))) == 1


def test_results_stream_is_jsonl_with_lf_lines(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    batch = client.messages.batches.create(requests=[request(f"r-{i}") for i in range(50)])
    control.advance(3)
    response = client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=httpx2.Response)
    assert response.headers["content-type"] == "application/x-jsonl"
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.headers["request-id"].startswith("req_")
    body = response.content
    assert body.endswith(b"\n") and b"\r" not in body and b"\n\n" not in body
    ids = [line.split(b'"custom_id":"')[1].split(b'"')[0].decode() for line in body.splitlines()]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(50))
    assert ids != [f"r-{i}" for i in range(50)], "results come back shuffled"
    again = client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=httpx2.Response)
    assert again.content == body, "the same seed gives the same order and ids"


def test_results_before_end_are_not_available(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request("a-1")])
    with pytest.raises(anthropic.NotFoundError) as info:
        client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=httpx2.Response)
    assert info.value.body["error"]["message"] == f"Message Batch {batch.id} has no available results."  # type: ignore[index]


def test_unknown_batch_is_not_found(client: anthropic.Anthropic) -> None:
    for call in (
        client.messages.batches.retrieve,
        client.messages.batches.cancel,
        client.messages.batches.delete,
    ):
        with pytest.raises(anthropic.NotFoundError) as info:
            call("msgbatch_doesnotexist000000000000")
        assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        assert info.value.body["type"] == "error"  # type: ignore[index]


def test_list_is_newest_first_with_cursor_pagination(client: anthropic.Anthropic) -> None:
    ids = [client.messages.batches.create(requests=[request("a")]).id for _ in range(5)]
    newest_first = list(reversed(ids))
    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more and page.first_id == newest_first[0] and page.last_id == newest_first[1]
    assert [b.id for b in client.messages.batches.list(limit=2)] == newest_first, "auto-pagination"
    after = client.messages.batches.list(limit=10, after_id=newest_first[1])
    assert [b.id for b in after.data] == newest_first[2:] and not after.has_more
    before = client.messages.batches.list(limit=2, before_id=newest_first[4])
    assert [b.id for b in before.data] == newest_first[2:4] and before.has_more
    assert len(client.messages.batches.list().data) == 5, "default limit 20"


def test_list_when_empty_has_null_ids(client: anthropic.Anthropic) -> None:
    page = client.messages.batches.list()
    assert page.data == [] and page.first_id is None and page.last_id is None and page.has_more is False


@pytest.mark.parametrize("limit", [0, 1001])
def test_list_rejects_limit_out_of_range(client: anthropic.Anthropic, limit: int) -> None:
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(limit=limit)


def test_unknown_query_parameters_are_ignored(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request("a")])
    assert client.messages.batches.retrieve(batch.id, extra_query={"beta": "true"}).id == batch.id
    assert client.messages.batches.list(extra_query={"whatever": "1"}).data[0].id == batch.id


def test_cancel_then_end_marks_unprocessed_requests_canceled(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch = client.messages.batches.create(requests=[request(f"r-{i}") for i in range(4)])
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    control.advance(1)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.request_counts.canceled == 4
    assert {r.result.type for r in client.messages.batches.results(batch.id)} == {"canceled"}
    assert control.ledger()["billed"] == {}


def test_delete_refuses_in_progress_and_removes_ended(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    batch = client.messages.batches.create(requests=[request("a")])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(batch.id)
    control.advance(3)
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_sync_message_is_standard_tier_and_billed(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    params = request("x", "Invoice from ACME for forty crates")["params"]
    message = client.messages.create(**params)
    assert message.usage.service_tier == "standard"
    assert message.content[0].type == "text"
    assert message.content[0].text == model.reply_text(params)
    ledger = control.ledger()
    assert ledger["sync_messages"] == 1 and ledger["live"]["output_tokens"] == message.usage.output_tokens
    assert ledger["output_tokens"] == 0  # live calls are billed apart from batches


def test_sync_message_errors_are_http_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="claude-nonexistent", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])


def test_count_tokens_uses_four_characters_per_token(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x" * 41}])
    assert counted.input_tokens == 11 == model.estimate_tokens("x" * 41)


def test_missing_key_is_401_with_the_api_error_body(emulator: EmulatorServer) -> None:
    client = anthropic.Anthropic(
        base_url=emulator.base_url,
        api_key="test-key",
        max_retries=0,
        default_headers={"Authorization": anthropic.Omit()},
    )
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.batches.list()
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert body["request_id"].startswith("req_")  # type: ignore[index]


def test_x_api_key_header_is_accepted(emulator: EmulatorServer) -> None:
    client = anthropic.Anthropic(
        base_url=emulator.base_url,
        api_key="test-key",
        max_retries=0,
        default_headers={"Authorization": anthropic.Omit(), "x-api-key": "test-key"},
    )
    assert client.messages.batches.list().data == []


def test_required_key_rejects_others(make_emulator: Callable[..., EmulatorServer]) -> None:
    server = make_emulator(require_key="sesame")
    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="test-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.batches.list()
    right = anthropic.Anthropic(base_url=server.base_url, api_key="sesame", max_retries=0)
    assert right.messages.batches.list().data == []


def test_every_response_has_a_request_id(client: anthropic.Anthropic) -> None:
    response = client.messages.batches.with_raw_response.list()
    assert response.headers["request-id"].startswith("req_")
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.batches.retrieve("msgbatch_nope")
    assert info.value.response.headers["request-id"].startswith("req_")


def test_timestamps_are_rfc3339_with_microseconds(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[request("a")])
    raw = client.messages.batches.with_raw_response.retrieve(batch.id).http_response.json()
    assert RFC3339.fullmatch(raw["created_at"]) and RFC3339.fullmatch(raw["expires_at"])
