"""An answer as the warehouse keeps it: the text, usage and names read (and checked) out of a message,
and the `etl_results` row built from them, one builder for the batch path (etl/settlement.py) and the
live path (etl/live.py).

The checks raise `Unreadable` with the reason the row ends `dead` with: a shape the API does not give,
or text no database would store.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from etl.errors import clean, describe
from etl.pricing import Usage
from etl.store import warehouse
from etl.store.dialect import Capabilities
from etl.store.schema import MoneyUnits


class Unreadable(Exception):
    """A result whose shape the API does not give: its row ends `dead` with this message as the reason."""


def kind_of(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number"
    )


def object_in(parent: dict[str, Any], key: str, *, optional: bool = False) -> dict[str, Any]:
    value = parent.get(key)
    if isinstance(value, dict):
        return value
    if optional and value is None:
        return {}
    raise Unreadable(f"unreadable result: `{key}` is {kind_of(value)}, not an object")


def string_in(parent: dict[str, Any], key: str) -> str | None:
    value = parent.get(key)
    if value is None or isinstance(value, str):
        return value
    raise Unreadable(f"unreadable result: `{key}` is {kind_of(value)}, not a string")


USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
TOKEN_LIMIT = 1 << 40  # far above any answer; keeps the sums inside a BIGINT
NO_USAGE = Usage()


def _usage(value: Any) -> Usage:
    """`usage` as the API gives it: an object of non-negative integer token counts (missing or null: 0)."""
    if value is None:
        return NO_USAGE
    if not isinstance(value, dict):
        raise Unreadable(f"unreadable result: `usage` is {kind_of(value)}, not an object")
    counts = [0, 0, 0, 0]
    for i, key in enumerate(USAGE_KEYS):
        n = value.get(key)
        if n is None:
            continue
        if type(n) is not int or not 0 <= n < TOKEN_LIMIT:
            raise Unreadable(f"unreadable result: usage.{key} is {clean(repr(n), 60)}, not a token count")
        counts[i] = n
    detail = value.get("cache_creation")
    if not counts[2] and (
        detail is None
        or (
            type(detail) is dict
            and not detail.get("ephemeral_5m_input_tokens")
            and not detail.get("ephemeral_1h_input_tokens")
        )
    ):  # nearly every result: no cache writes, so no breakdown to price (as Usage.from_api reads it)
        return Usage(counts[0], counts[1], 0, 0, counts[3])
    if detail is not None and not isinstance(detail, dict):
        value = {**value, "cache_creation": None}  # the breakdown is optional: priced at the 5-minute rate
    try:
        return Usage.from_api(value)
    except (TypeError, ValueError) as exc:
        raise Unreadable(f"unreadable result: usage.cache_creation: {describe(exc)}") from None


def storable(text: str, what: str, caps: Capabilities) -> None:
    """Refuse, with a reason that says why, what no database would store: a lone surrogate (not Unicode:
    neither driver encodes it) and, on PostgreSQL, a NUL character. Raises `Unreadable`."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Unreadable(
                f"unstorable result: {what} holds a lone surrogate U+{ord(text[exc.start]):04X} at character "
                f"{exc.start}, which is not Unicode text"
            ) from None
    if not caps.nul_in_text and "\x00" in text:
        raise Unreadable(
            f"unstorable result: {what} holds a NUL character at character {text.index(chr(0))}, which "
            "PostgreSQL cannot store in text"
        )


def checked_answer(message: dict[str, Any], caps: Capabilities) -> tuple[str, Usage, str, str | None]:
    """A succeeded answer's text, usage, model and stop_reason, checked as the batch path checks them (the
    live path's answers too). Raises `Unreadable` with the reason its row ends `dead` with."""
    text = text_of(message)
    storable(text, "the output text", caps)
    usage = _usage(message.get("usage"))
    model = string_in(message, "model") or ""
    stop_reason = string_in(message, "stop_reason")
    storable(model, "the model name", caps)
    storable(stop_reason or "", "the stop_reason", caps)
    return text, usage, model, stop_reason


def no_text_reason(message: dict[str, Any]) -> str:
    """What an answer without text held: "no text block: tool_use, thinking" or "no text block: empty content"."""
    content = message.get("content")
    if not isinstance(content, list) or not content:
        return "no text block: empty content" if isinstance(content, list) else "no text block: no content"
    if any(isinstance(b, dict) and b.get("type") == "text" for b in content):
        return "empty text: the text block(s) hold no text"
    kinds: list[str] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        name = clean(kind, 40) if isinstance(kind, str) else kind_of(block)
        if name not in kinds:
            kinds.append(name)
    return f"no text block: {', '.join(kinds[:5])}"


def text_of(message: dict[str, Any]) -> str:
    """The message's text blocks, joined; anything else in `content` (or a malformed one) adds nothing."""
    content = message.get("content")
    if not isinstance(content, list):
        return ""
    if len(content) == 1:  # nearly every message: one text block
        block = content[0]
        text = block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
        return text if isinstance(text, str) else ""
    return "".join(
        text
        for block in content
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(text := block.get("text"), str)
    )


RESULT_COLUMNS = [
    "doc_key",
    "task",
    "queue_id",
    "custom_id",
    "output_text",
    "output_json",
    "model",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "standard_cost_usd",
    "batch_id",
    "enqueued_at",
    "batch_ended_at",
    "collected_at",
    "mode",
]
if RESULT_COLUMNS != warehouse.COLUMNS:
    raise ImportError(f"etl_results columns changed: {warehouse.COLUMNS}; update answer.RESULT_COLUMNS")


def parsed_json(text: str) -> Any:
    """The output text as JSON, for a task with an `output_schema`; None when it is not JSON."""
    try:
        return json.loads(text)  # not codec: exact integers of any width
    except (ValueError, RecursionError):
        return None


def result_row(
    *,
    doc_key: str,
    task: str,
    queue_id: int,
    answer: tuple[str, Usage, str, str | None],
    output_json: Any,
    cost: Decimal | MoneyUnits,
    standard: Decimal | MoneyUnits,
    source_id: str | None,
    enqueued_at: datetime | None,
    ended_at: datetime | None,
    collected_at: datetime,
    mode: str,
) -> list[Any]:
    """The `etl_results` row of one answer, as its values in `RESULT_COLUMNS` order. `answer` is what
    `checked_answer` returned; `source_id` the batch id, or the Message id of a live answer."""
    text, usage, model, stop_reason = answer
    return [
        doc_key,
        task,
        queue_id,
        f"q{queue_id}",  # the legacy custom_id (etl.prompt.custom_id without an installation)
        text,
        output_json,
        model,
        stop_reason,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_write,
        usage.cache_read,
        cost,
        standard,
        source_id,
        enqueued_at,
        ended_at,
        collected_at,
        mode,
    ]
