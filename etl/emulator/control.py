"""A small client for the emulator's ``/_emulator/*`` control endpoints (standard library only)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from etl.emulator.clock import parse_time


class EmulatorControl:
    """Drive a running emulator: its clock, faults, ledger and reset."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/_emulator/{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def now(self) -> datetime:
        """The emulator's virtual now."""
        return parse_time(self._call("GET", "clock")["now"])

    def advance(self, seconds: float) -> datetime:
        """Advance virtual time by ``seconds``; returns the new virtual now."""
        return parse_time(self._call("POST", "clock", {"advance_seconds": seconds})["now"])

    def set_faults(
        self,
        rules: Sequence[Mapping[str, Any]] = (),
        outcomes: Sequence[Mapping[str, Any]] = (),
        mode: str = "replace",
        list_delay_seconds: float | None = None,
        clock_offset_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Replace (or append to) the fault configuration; returns the configuration now in force.

        `clock_offset_seconds` (any sign) sets the API clock offset: every timestamp the API writes (batch
        times, the `Date` header) is that far off the virtual clock. "replace" resets it to 0 when omitted."""
        body: dict[str, Any] = {"rules": list(rules), "outcomes": list(outcomes), "mode": mode}
        if list_delay_seconds is not None:
            body["list_delay_seconds"] = list_delay_seconds
        if clock_offset_seconds is not None:
            body["clock_offset_seconds"] = clock_offset_seconds
        result: dict[str, Any] = self._call("POST", "faults", body)
        return result

    def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "faults")
        return result

    def clear_faults(self) -> None:
        self._call("DELETE", "faults")

    def ledger(self) -> dict[str, Any]:
        """Batches and requests created, times each custom_id was billed, and token totals."""
        result: dict[str, Any] = self._call("GET", "ledger")
        return result

    def set_live(self, **settings: float) -> dict[str, Any]:
        """Latency (`latency_seconds`, `jitter_seconds`) and limits (`requests_per_minute`,
        `tokens_per_minute`) of POST /v1/messages; unnamed settings go back to 0 (none)."""
        result: dict[str, Any] = self._call("POST", "live", settings)
        return result

    def reset(self) -> None:
        """Forget all batches, the ledger, faults and clock advances."""
        self._call("POST", "reset", {})
