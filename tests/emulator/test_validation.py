"""Create-time validation (HTTP errors) and params validation (errored result lines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import pytest

from etl.emulator import EmulatorControl, EmulatorServer
from tests.emulator.conftest import MODEL, request


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error"
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([], "requests: List should have at least 1 item"),
        ([{"params": request("a")["params"]}], "requests.0.custom_id: Field required"),
        ([request("has space")], "requests.0.custom_id: String should match pattern"),
        ([request("x" * 65)], "requests.0.custom_id: String should match pattern"),
        ([request("")], "requests.0.custom_id: String should match pattern"),
        ([{"custom_id": "a"}], "requests.0.params: Field required"),
        (
            [request("dup"), request("ok"), request("dup")],
            "custom_id's must be unique within a batch. Duplicate custom_id found: dup",
        ),
    ],
)
def test_create_rejects_malformed_batches(
    client: anthropic.Anthropic, requests: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    error = error_of(info.value)
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)


def test_create_rejects_more_than_100000_requests(
    client: anthropic.Anthropic, control: EmulatorControl
) -> None:
    requests = [{"custom_id": f"r{i}", "params": {}} for i in range(100_001)]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert "at most 100000" in error_of(info.value)["message"]
    assert control.ledger()["batches_created"] == 0


def test_create_rejects_invalid_json(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post(
            "/v1/messages/batches",
            cast_to=httpx2.Response,
            content=b'{"requests": [',
            options={"headers": {"content-type": "application/json"}},
        )
    assert "not valid JSON" in error_of(info.value)["message"]


def test_create_over_the_size_limit_is_413(make_emulator: Callable[..., EmulatorServer]) -> None:
    server = make_emulator(max_request_bytes=10_000)
    client = anthropic.Anthropic(base_url=server.base_url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.batches.create(requests=[request(f"r{i}", "x" * 500) for i in range(40)])
    assert info.value.status_code == 413
    assert error_of(info.value)["type"] == "request_too_large"
    assert client.messages.batches.list().data == [], "the connection survives and nothing was created"


PARAMS_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"model": "claude-unknown-9"}, "not_found_error", "model: claude-unknown-9"),
    ({"messages": None}, "invalid_request_error", "messages: Field required"),
    ({"max_tokens": 0}, "invalid_request_error", "max_tokens: Input should be greater than or equal to 1"),
    (
        {"max_tokens": 100_000},
        "invalid_request_error",
        "max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for "
        "claude-haiku-4-5-20251001",
    ),
    ({"stream": True}, "invalid_request_error", "stream: streaming is not supported in Message Batches"),
    ({"colour": "blue"}, "invalid_request_error", "colour: Extra inputs are not permitted"),
    ({"temperature": 0.2}, "invalid_request_error", "temperature: is not supported"),
    ({"top_p": 0.9}, "invalid_request_error", "top_p: is not supported"),
    ({"top_k": 5}, "invalid_request_error", "top_k: is not supported"),
]


def test_bad_params_come_back_as_errored_lines(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    requests = [request("good")]
    for i, (override, _, _) in enumerate(PARAMS_ERRORS):
        item = request(f"bad-{i}")
        item["params"].update(override)
        item["params"] = {k: v for k, v in item["params"].items() if v is not None}
        requests.append(item)
    batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    control.advance(3)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["good"].type == "succeeded"
    for i, (_, error_type, message) in enumerate(PARAMS_ERRORS):
        result = results[f"bad-{i}"]
        assert result.type == "errored", (i, result)
        assert result.error.error.type == error_type
        assert result.error.error.message.startswith(message)
    counts = client.messages.batches.retrieve(batch.id).request_counts
    assert (counts.succeeded, counts.errored) == (1, len(PARAMS_ERRORS))
    assert control.ledger()["billed"] == {"good": 1}


def test_sampling_params_are_accepted_under_the_old_api_version(
    make_client: Callable[..., anthropic.Anthropic], control: EmulatorControl
) -> None:
    client = make_client(default_headers={"anthropic-version": "2023-06-01"})
    batch = client.messages.batches.create(requests=[request("a", temperature=0.3, top_k=4)])  # type: ignore[list-item]
    control.advance(3)
    assert [r.result.type for r in client.messages.batches.results(batch.id)] == ["succeeded"]


def test_model_aliases_resolve_to_dated_ids(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    aliases = {
        "claude-haiku-4-5": "claude-haiku-4-5-20251001",
        "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-6": "claude-sonnet-4-6",
        "claude-opus-4-5": "claude-opus-4-5-20251101",
        "claude-opus-4-1": "claude-opus-4-1-20250805",
    }
    batch = client.messages.batches.create(
        requests=[request(alias.replace(".", "_"), model=alias) for alias in aliases]  # type: ignore[misc]
    )
    control.advance(3)
    for result in client.messages.batches.results(batch.id):
        assert result.result.type == "succeeded"
        assert result.result.message.model == aliases[result.custom_id]
    assert MODEL in aliases
