"""The provider seam's contract, whatever the SDK version does with a transport failure.

The daemon never sees an SDK or transport exception: `etl.provider` turns every one into a
`ProviderError` whose `kind` says what may be done next, and a results stream that breaks or stalls into
`ResultsIncomplete`. anthropic up to 2.16 lets a failure while *reading a body* through as the transport's
own `ReadError`/`RemoteProtocolError`/`ReadTimeout`; 2.17 wraps it in `APIConnectionError`/
`APITimeoutError` (with the transport's error as `__cause__`). Both shapes are built here by hand and
mapped, so the mapping is checked for both whichever version is installed; the emulator-backed tests
below then drive the installed SDK through real broken streams. `scripts/test.sh` runs this module
against the lock's SDK and against the oldest the range allows (`requirements/oldest.txt`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import anthropic
import httpx2
import pytest

from etl.emulator import EmulatorControl, EmulatorServer
from etl.errors import ProviderError, ResultsIncomplete
from etl.provider import Provider, translate
from tests.emulator.conftest import request

REQUEST = httpx2.Request("GET", "http://127.0.0.1:9/v1/messages/batches/x")


def raw(exc: BaseException) -> BaseException:
    """The transport's error as anthropic <= 2.16 let it through."""
    return exc


def wrapped(exc: BaseException) -> BaseException:
    """The same error as anthropic 2.17 raises it: the SDK's connection/timeout error, caused by it."""
    outer: BaseException
    if isinstance(exc, httpx2.TimeoutException):
        outer = anthropic.APITimeoutError(REQUEST)
    else:
        outer = anthropic.APIConnectionError(message=f"Connection failed: {exc}", request=REQUEST)
    outer.__cause__ = exc
    return outer


SHAPES = [pytest.param(raw, id="raw"), pytest.param(wrapped, id="wrapped")]
AFTER_SENDING = [
    pytest.param(lambda: httpx2.ReadError("[Errno 104] Connection reset by peer"), id="read-error"),
    pytest.param(lambda: httpx2.RemoteProtocolError("peer closed connection"), id="protocol-error"),
    pytest.param(lambda: httpx2.ReadTimeout("timed out"), id="read-timeout"),
    pytest.param(lambda: httpx2.WriteError("broken pipe"), id="write-error"),
]
BEFORE_SENDING = [
    pytest.param(lambda: httpx2.ConnectError("[Errno 111] Connection refused"), id="refused"),
    pytest.param(lambda: httpx2.ConnectTimeout("connect timed out"), id="connect-timeout"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", AFTER_SENDING)
def test_a_failure_after_the_request_left_is_doubt_for_a_create(
    shape: Callable[[BaseException], BaseException], make: Callable[[], BaseException]
) -> None:
    error = shape(make())
    assert isinstance(error, Exception)
    assert translate(error, "create batch", mutating=True).kind == "ambiguous"
    assert translate(error, "retrieve", mutating=False).kind == "transient"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", BEFORE_SENDING)
def test_a_failure_before_any_connection_is_unreachable(
    shape: Callable[[BaseException], BaseException], make: Callable[[], BaseException]
) -> None:
    """Nothing left this host, whichever way the SDK wraps it: a create may be released at once."""
    error = shape(make())
    assert isinstance(error, Exception)
    assert translate(error, "create batch", mutating=True).kind == "unreachable"


def test_an_exception_the_seam_does_not_know_is_not_swallowed() -> None:
    with pytest.raises(KeyError):
        translate(KeyError("x"), "create batch", mutating=True)


def ended_batch(emulator: EmulatorServer, control: EmulatorControl, n: int = 6) -> str:
    client = anthropic.Anthropic(base_url=emulator.base_url, api_key="test-key", max_retries=0)
    try:
        batch = client.messages.batches.create(requests=[request(f"r{i}") for i in range(n)])
    finally:
        client.close()
    control.advance(3)
    return batch.id


@pytest.fixture
def provider(emulator: EmulatorServer) -> Iterator[Provider]:
    made = Provider(api_key="test-key", base_url=emulator.base_url, timeout=5.0, read_retries=0)
    yield made
    made.close()


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param({"action": "stream_reset", "after_lines": 3}, id="reset-mid-stream"),
        pytest.param({"action": "break_at", "at_byte": 0}, id="break-at-byte-0"),
        pytest.param({"action": "break_at", "at_byte": 1}, id="break-at-byte-1"),
        pytest.param({"action": "stall", "after_lines": 2, "stall_seconds": 1}, id="stall"),
    ],
)
def test_a_broken_results_stream_is_results_incomplete(
    emulator: EmulatorServer, control: EmulatorControl, provider: Provider, rule: dict[str, object]
) -> None:
    batch_id = ended_batch(emulator, control)
    control.set_faults(rules=[{"endpoint": "results", **rule}])
    with pytest.raises(ResultsIncomplete):
        list(provider.iter_result_lines(batch_id, stall_timeout=0.3))
    with pytest.raises(ResultsIncomplete):  # the reconciler's first-line read of a batch: who sent it
        next(provider.result_custom_ids(batch_id, stall_timeout=0.3))
    control.clear_faults()
    assert len(list(provider.iter_result_lines(batch_id, stall_timeout=5.0))) == 6


def test_a_reset_create_is_ambiguous_and_a_reset_read_is_transient(
    emulator: EmulatorServer, control: EmulatorControl, provider: Provider
) -> None:
    batch_id = ended_batch(emulator, control)
    control.set_faults(rules=[{"endpoint": "create", "action": "reset"}])
    body = json.dumps({"requests": [request("a")]}).encode()
    with pytest.raises(ProviderError) as info:
        provider.create_batch(body)
    assert info.value.kind == "ambiguous"
    control.set_faults(rules=[{"endpoint": "retrieve", "action": "reset"}])
    with pytest.raises(ProviderError) as read_info:
        provider.retrieve(batch_id)
    assert read_info.value.kind == "transient"
