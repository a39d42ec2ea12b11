"""A full-size batch: 100,000 requests in, 100,000 results out."""

from __future__ import annotations

import time
from collections.abc import Callable

import anthropic
import pytest

from etl.emulator import EmulatorServer
from tests.emulator.conftest import request

N = 100_000


@pytest.mark.slow
def test_100k_requests_create_and_stream(make_emulator: Callable[..., EmulatorServer]) -> None:
    server = make_emulator(processing_seconds=0)
    client = anthropic.Anthropic(base_url=server.base_url, api_key="test-key", max_retries=0, timeout=120)
    body_text = "Product description with enough words to be realistic. " * 22
    requests = [request(f"doc-{i}", f"{i} {body_text}") for i in range(N)]
    started = time.perf_counter()
    batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    created = time.perf_counter()
    assert batch.request_counts.succeeded == N
    seen = set()
    for line in client.messages.batches.results(batch.id):
        seen.add(line.custom_id)
    streamed = time.perf_counter()
    assert len(seen) == N
    print(f"\n100k create {created - started:.1f}s, stream {streamed - created:.1f}s")
