"""The deterministic fake model: replies, structured output, token estimates and params validation.

Everything here is a pure function of the request params, so tests and other code can compute the exact
output the emulator will return for a document:

- ``reply_text(params)`` = ``"Summary: " + the first 12 words of the last user message's text + " [" + the
  first 8 hex digits of sha256(that text) + "]"`` (``"Summary: (empty) [e3b0c442]"`` with no words).
- with ``output_config.format = {"type": "json_schema", "schema": ...}`` the reply is
  ``json.dumps(reply_json(params))``: a value that validates against the schema, derived from the text.
- ``estimate_tokens(text) = ceil(len(text) / 4)`` (0 for ""). Input tokens = estimate of the system text
  (blocks joined by "\\n") + estimate of the messages' text (all text joined by "\\n"). Output tokens =
  estimate of the reply; a reply longer than ``max_tokens * 4`` characters is cut there, with
  ``stop_reason = "max_tokens"`` and ``output_tokens = max_tokens``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from etl.emulator.catalog import resolve_model

SUMMARY_WORDS = 12
NEW_API_VERSION = "2026-10-21"

KNOWN_PARAMS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "service_tier",
        "container",
        "cache_control",
        "diagnostics",
        "inference_geo",
        "speed",
        "prefill",
        "user_profile_id",
    }
)
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class ParamsError:
    """Why params were refused: an API error type and message."""

    type: str
    message: str


def _mapping(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """`isinstance(value, Mapping)`, answered without the ABC machinery for the usual case (a dict):
    the ABC check was a fifth of the emulator's CPU per request."""
    return type(value) is dict or isinstance(value, Mapping)


def _sequence(value: Any) -> TypeGuard[Sequence[Any]]:
    return type(value) is list or isinstance(value, Sequence)


def estimate_tokens(text: str) -> int:
    """About four characters per token: ``ceil(len(text) / 4)``."""
    return math.ceil(len(text) / 4)


def _block_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if _sequence(content):
        for block in content:
            if _mapping(block) and isinstance(block.get("text"), str):
                texts.append(block["text"])
    return texts


def last_user_text(params: Mapping[str, Any]) -> str:
    """The text of the last user message (text blocks joined by a space)."""
    messages = params.get("messages")
    if _sequence(messages) and not isinstance(messages, str):
        for message in reversed(messages):
            if _mapping(message) and message.get("role") == "user":
                return " ".join(_block_texts(message.get("content")))
    return ""


def reply_text(params: Mapping[str, Any]) -> str:
    """The fake model's full (untruncated) plain-text reply."""
    text = last_user_text(params)
    words = text.split(maxsplit=SUMMARY_WORDS)[:SUMMARY_WORDS]
    head = " ".join(words) if words else "(empty)"
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"Summary: {head} [{digest}]"


def _json_schema(params: Mapping[str, Any]) -> Mapping[str, Any] | None:
    config = params.get("output_config")
    if _mapping(config):
        fmt = config.get("format")
        if _mapping(fmt) and fmt.get("type") == "json_schema":
            schema = fmt.get("schema")
            if _mapping(schema):
                return schema
    return None


def _seed(text: str, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{path}\x00{text}".encode()).digest()[:8], "big")


def _value_for(schema: Mapping[str, Any], text: str, path: str) -> Any:
    h = _seed(text, path)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), Sequence) and schema["enum"]:
        return schema["enum"][h % len(schema["enum"])]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, Sequence) and options:
            non_null = [o for o in options if isinstance(o, Mapping) and o.get("type") != "null"]
            return _value_for((non_null or list(options))[0], text, path)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, Sequence) and not isinstance(kind, str):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if kinds else "null"
    if kind == "object":
        props = schema.get("properties") or {}
        names = list(props) + [n for n in schema.get("required") or [] if n not in props]
        return {n: _value_for(props.get(n) or {}, text, f"{path}.{n}") for n in names}
    if kind == "array":
        items = schema.get("items") or {}
        count = max(int(schema.get("minItems", 1)), 1)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [_value_for(items, text, f"{path}[{i}]") for i in range(count)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 1000))
        return low + h % (high - low + 1)
    if kind == "number":
        lo = float(schema.get("minimum", 0.0))
        hi = float(schema.get("maximum", lo + 1000.0))
        return round(lo + (h % 10_001) / 10_000 * (hi - lo), 4)
    if kind == "boolean":
        return bool(h % 2)
    if kind == "null":
        return None
    words = text.split() or ["empty"]
    start = h % len(words)
    value = " ".join(words[start : start + 3]) + f" {h % 10_000:04d}"
    if "maxLength" in schema:
        value = value[: int(schema["maxLength"])]
    min_length = int(schema.get("minLength", 0))
    return value + "x" * max(0, min_length - len(value))


def reply_json(params: Mapping[str, Any]) -> Any:
    """A JSON value valid against ``output_config.format.schema``, derived from the last user text.

    Objects get every property (required and optional), arrays ``max(minItems, 1)`` items (capped by
    ``maxItems``), enums a member chosen by hash, integers/numbers a hash-derived value within
    ``minimum``..``maximum`` (default 0..1000), strings three words of the input plus four digits, and
    nullable types (``["string", "null"]``, ``anyOf`` with null) their non-null type.
    """
    schema = _json_schema(params)
    if schema is None:
        raise ValueError("params have no output_config.format of type json_schema")
    return _value_for(schema, last_user_text(params), "$")


def full_reply(params: Mapping[str, Any]) -> str:
    """The content text before any ``max_tokens`` truncation."""
    if _json_schema(params) is not None:
        return json.dumps(reply_json(params))
    return reply_text(params)


@dataclass(frozen=True)
class PromptSplit:
    """Input tokens split into a cacheable system prefix and the rest."""

    cache_key: str | None
    cache_ttl: str
    cached_tokens: int
    input_tokens: int


@functools.lru_cache(maxsize=256)
def _cache_key(model: str, prefix: str) -> str:
    """The prompt cache's key of a system prefix: the same few prefixes come back with every request."""
    return hashlib.sha256(f"{model}\x00{prefix}".encode()).hexdigest()


def split_prompt(params: Mapping[str, Any]) -> PromptSplit:
    """Token estimate of the prompt and of the system prefix up to the last ``cache_control`` block."""
    system = params.get("system")
    system_blocks: list[Any] = [] if system is None else [system] if isinstance(system, str) else list(system)
    texts = [t for b in system_blocks for t in (_block_texts([b]) if _mapping(b) else [str(b)])]
    last_marked = -1
    ttl = "5m"
    for i, block in enumerate(system_blocks):
        if _mapping(block) and _mapping(block.get("cache_control")):
            last_marked = i
            ttl = "1h" if block["cache_control"].get("ttl") == "1h" else "5m"
    message_texts: list[str] = []
    for message in params.get("messages") or []:
        if _mapping(message):
            message_texts.extend(_block_texts(message.get("content")))
    rest_tokens = estimate_tokens("\n".join(message_texts))
    if last_marked < 0:
        return PromptSplit(None, ttl, 0, estimate_tokens("\n".join(texts)) + rest_tokens)
    prefix = "\n".join(texts[: last_marked + 1])
    suffix = "\n".join(texts[last_marked + 1 :])
    key = _cache_key(str(params.get("model")), prefix)
    return PromptSplit(key, ttl, estimate_tokens(prefix), estimate_tokens(suffix) + rest_tokens)


def count_tokens(params: Mapping[str, Any]) -> int:
    """What ``POST /v1/messages/count_tokens`` answers: all input tokens, cached or not."""
    split = split_prompt(params)
    return split.cached_tokens + split.input_tokens


def validate_params(
    params: Any, api_version: str | None, *, in_batch: bool, require_max_tokens: bool = True
) -> ParamsError | None:
    """The error the API would give these Messages params, or None when they are acceptable."""
    if not _mapping(params):
        return ParamsError("invalid_request_error", "params: Input should be a valid dictionary")
    for name in params:
        if name in SAMPLING_PARAMS:
            if api_version == NEW_API_VERSION:
                return ParamsError(
                    "invalid_request_error",
                    f"{name}: is not supported with anthropic-version {NEW_API_VERSION}",
                )
        elif name not in KNOWN_PARAMS:
            return ParamsError("invalid_request_error", f"{name}: Extra inputs are not permitted")
    model = params.get("model")
    if not isinstance(model, str):
        return ParamsError("invalid_request_error", "model: Field required")
    info = resolve_model(model)
    if info is None:
        return ParamsError("not_found_error", f"model: {model}")
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        return ParamsError("invalid_request_error", "messages: Field required")
    for i, message in enumerate(messages):
        if not _mapping(message) or message.get("role") not in ("user", "assistant"):
            return ParamsError(
                "invalid_request_error", f"messages.{i}.role: Input should be 'user' or 'assistant'"
            )
        if "content" not in message:
            return ParamsError("invalid_request_error", f"messages.{i}.content: Field required")
    if require_max_tokens:
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            return ParamsError("invalid_request_error", "max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return ParamsError(
                "invalid_request_error", "max_tokens: Input should be greater than or equal to 1"
            )
        if max_tokens > info.max_output_tokens:
            return ParamsError(
                "invalid_request_error",
                f"max_tokens: {max_tokens} > {info.max_output_tokens}, which is the maximum allowed number "
                f"of output tokens for {info.id}",
            )
    if params.get("stream"):
        where = "in Message Batches" if in_batch else "by the emulator"
        return ParamsError("invalid_request_error", f"stream: streaming is not supported {where}")
    return None


@dataclass(frozen=True)
class Reply:
    text: str
    stop_reason: str
    output_tokens: int


def make_reply(params: Mapping[str, Any]) -> Reply:
    """The reply after ``max_tokens`` truncation (params must already be valid)."""
    text = full_reply(params)
    max_tokens = int(params["max_tokens"])
    if len(text) > max_tokens * 4:
        return Reply(text[: max_tokens * 4], "max_tokens", max_tokens)
    return Reply(text, "end_turn", estimate_tokens(text))


def usage(
    params: Mapping[str, Any],
    reply: Reply,
    cache: str | None,
    service_tier: str,
    split: PromptSplit | None = None,
) -> dict[str, Any]:
    """The ``usage`` object. ``cache`` is None, ``"write"`` or ``"read"`` for the system prefix.
    ``split``: ``split_prompt(params)`` when the caller has it already."""
    split = split or split_prompt(params)
    write = split.cached_tokens if cache == "write" else 0
    read = split.cached_tokens if cache == "read" else 0
    uncached = split.input_tokens + (split.cached_tokens if cache is None else 0)
    return {
        "input_tokens": uncached,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": write if split.cache_ttl == "5m" else 0,
            "ephemeral_1h_input_tokens": write if split.cache_ttl == "1h" else 0,
        },
        "output_tokens": reply.output_tokens,
        "service_tier": service_tier,
    }


def message(
    message_id: str,
    params: Mapping[str, Any],
    cache: str | None,
    service_tier: str,
    split: PromptSplit | None = None,
) -> dict[str, Any]:
    """A complete Message object as the API returns it (params must already be valid)."""
    reply = make_reply(params)
    info = resolve_model(str(params["model"]))
    assert info is not None
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": info.id,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": usage(params, reply, cache, service_tier, split),
    }
