"""The results body as the emulator streams it: its lines gathered into ~1 MB chunks, with the stream faults
(a line limit, a cut line, an extra line, a break at a byte) applied to what is sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from etl.emulator.faults import EndpointRule
from etl.emulator.state import result_lines

CHUNK_BYTES = 1 << 20


def chunks(batch: Any, seed: int, rule: EndpointRule | None) -> Iterator[bytes]:
    """The data of each chunk of the results body, faults applied (not `break_at`: see `first_bytes`)."""
    lines = result_lines(batch, seed)
    limit = rule.after_lines if rule is not None else None
    if rule is not None and rule.action == "extra_line":
        lines, limit = with_extra_line(lines, rule.custom_id or ""), None
    buffer: list[bytes] = []
    size = 0
    for sent, line in enumerate(lines):
        if limit is not None and sent >= limit:
            if rule is not None and rule.action == "cut_line":
                buffer.append(line[: max(1, len(line) // 2)])
            break
        buffer.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield b"".join(buffer)
            buffer.clear()
            size = 0
    if buffer:
        yield b"".join(buffer)


def first_bytes(batch: Any, seed: int, at_byte: int) -> Iterator[bytes]:
    """`break_at`: the first `at_byte` bytes of the results body, as chunks (none for 0; the whole body when
    it is shorter)."""
    sent = 0
    for line in result_lines(batch, seed):
        part = line[: at_byte - sent]
        if part:
            yield part
            sent += len(part)
        if sent >= at_byte:
            break


def with_extra_line(lines: Iterator[bytes], custom_id: str) -> Iterator[bytes]:
    """`extra_line`: every line, then one more: the first line's result under `custom_id` (a row of
    another batch, a foreign id, a duplicate), as a mixed-up API would send it."""
    first: bytes | None = None
    for line in lines:
        first = first or line
        yield line
    result = json.loads(first)["result"] if first else {"type": "canceled"}
    yield json.dumps({"custom_id": custom_id, "result": result}, separators=(",", ":")).encode() + b"\n"
