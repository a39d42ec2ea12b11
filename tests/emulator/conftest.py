"""Fixtures for the emulator conformance suite: every test talks to a real loopback emulator through the
real ``anthropic`` SDK with strict response validation."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # so `etl` (uninstalled checkout) and `tests.emulator.conftest` import
    sys.path.insert(0, ROOT)

from etl.emulator import EmulatorConfig, EmulatorControl, EmulatorServer  # noqa: E402

MODEL = "claude-haiku-4-5"


def request(custom_id: str, text: str = "", **params: Any) -> dict[str, Any]:
    """One batch request whose user message is ``text`` (default: derived from the custom_id)."""
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": text or f"Document {custom_id} about shipping crates"}],
    }
    body.update(params)
    return {"custom_id": custom_id, "params": body}


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., EmulatorServer]]:
    started: list[EmulatorServer] = []

    def make(**overrides: Any) -> EmulatorServer:
        server = EmulatorServer(EmulatorConfig(**{"port": 0, **overrides})).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def emulator(make_emulator: Callable[..., EmulatorServer]) -> EmulatorServer:
    return make_emulator()


@pytest.fixture
def control(emulator: EmulatorServer) -> EmulatorControl:
    return EmulatorControl(emulator.base_url)


@pytest.fixture
def make_client(emulator: EmulatorServer) -> Iterator[Callable[..., anthropic.Anthropic]]:
    clients: list[anthropic.Anthropic] = []

    def make(**overrides: Any) -> anthropic.Anthropic:
        options: dict[str, Any] = {
            "base_url": emulator.base_url,
            "api_key": "test-key",
            "_strict_response_validation": True,
            "max_retries": 0,
        }
        options.update(overrides)
        client = anthropic.Anthropic(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., anthropic.Anthropic]) -> anthropic.Anthropic:
    """A client that does not retry, so every status the emulator gives surfaces as is."""
    return make_client()
