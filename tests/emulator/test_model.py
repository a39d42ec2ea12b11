"""The fake model: pure functions, structured output, usage and prompt caching."""

from __future__ import annotations

import json
from typing import Any

import anthropic
from hypothesis import given
from hypothesis import strategies as st

from etl.emulator import EmulatorControl, model
from tests.emulator.conftest import request

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["electronics", "garden", "toys"]},
        "title": {"type": "string", "maxLength": 40},
        "price": {"type": "number", "minimum": 1, "maximum": 500},
        "stock": {"type": "integer", "minimum": 0, "maximum": 9},
        "fragile": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "dims": {"type": "object", "properties": {"w": {"type": "integer"}}, "required": ["w"]},
    },
    "required": ["category", "title", "price", "stock", "fragile", "tags"],
    "additionalProperties": False,
}


def check(schema: dict[str, Any], value: Any) -> None:
    """A small validator for the schema subset reply_json supports."""
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "enum" in schema:
        assert value in schema["enum"]
    if value is None:
        assert "null" in kinds
    elif isinstance(value, bool):
        assert "boolean" in kinds
    elif isinstance(value, int) and "integer" in kinds:
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value)
    elif isinstance(value, int | float):
        assert "number" in kinds
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value)
    elif isinstance(value, str):
        assert "string" in kinds and len(value) <= schema.get("maxLength", len(value))
    elif isinstance(value, list):
        assert "array" in kinds and len(value) >= schema.get("minItems", 0)
        for item in value:
            check(schema["items"], item)
    else:
        assert "object" in kinds and set(schema.get("required", [])) <= set(value)
        for key, item in value.items():
            check(schema["properties"][key], item)


def structured(text: str) -> dict[str, Any]:
    params = request("x", text)["params"]
    params["output_config"] = {"format": {"type": "json_schema", "schema": SCHEMA}}
    return params  # type: ignore[no-any-return]


@given(st.text(min_size=0, max_size=200))
def test_reply_json_validates_against_the_schema(text: str) -> None:
    check(SCHEMA, model.reply_json(structured(text)))


def test_reply_json_differs_per_document() -> None:
    values = {json.dumps(model.reply_json(structured(f"Product number {i} is a lamp"))) for i in range(20)}
    assert len(values) == 20


def test_reply_text_is_stable_and_content_sensitive() -> None:
    a = request("a", "The quick brown fox")["params"]
    assert model.reply_text(a) == model.reply_text(dict(a))
    assert model.reply_text(a).startswith("Summary: The quick brown fox [")
    assert model.reply_text(a) != model.reply_text(request("a", "The quick brown cat")["params"])


def test_structured_output_through_the_api(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    params = structured("A garden hose, green, 20 metres")
    batch = client.messages.batches.create(requests=[{"custom_id": "p-1", "params": params}])  # type: ignore[list-item]
    control.advance(3)
    [line] = list(client.messages.batches.results(batch.id))
    assert line.result.type == "succeeded"
    block = line.result.message.content[0]
    assert block.type == "text" and json.loads(block.text) == model.reply_json(params)


def test_reply_over_max_tokens_is_truncated(client: anthropic.Anthropic) -> None:
    params = request("x", "one two three four five six seven eight nine ten", max_tokens=3)["params"]
    message = client.messages.create(**params)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and message.content[0].text == model.reply_text(params)[:12]
    assert message.usage.output_tokens == 3


def test_usage_follows_the_four_characters_rule() -> None:
    params = request("x", "y" * 100, system="s" * 40)["params"]
    reply = model.make_reply(params)
    usage = model.usage(params, reply, None, "batch")
    assert usage["input_tokens"] == 10 + 25
    assert usage["output_tokens"] == model.estimate_tokens(model.reply_text(params))


def cached_request(custom_id: str, ttl: str | None = None) -> dict[str, Any]:
    cache_control: dict[str, str] = {"type": "ephemeral"} | ({"ttl": ttl} if ttl else {})
    system = [{"type": "text", "text": "Shared instructions. " * 20, "cache_control": cache_control}]
    return request(custom_id, system=system)


def test_prompt_cache_writes_once_then_reads(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    batch = client.messages.batches.create(requests=[cached_request(f"c{i}", "1h") for i in range(3)])  # type: ignore[misc]
    control.advance(3)
    usages = sorted(
        (r.result.message.usage for r in client.messages.batches.results(batch.id)),  # type: ignore[union-attr]
        key=lambda u: -(u.cache_creation_input_tokens or 0),
    )
    prefix = model.estimate_tokens("Shared instructions. " * 20)
    assert usages[0].cache_creation_input_tokens == prefix
    assert (
        usages[0].cache_creation is not None and usages[0].cache_creation.ephemeral_1h_input_tokens == prefix
    )
    assert [u.cache_read_input_tokens for u in usages[1:]] == [prefix, prefix]
    ledger = control.ledger()
    assert (ledger["cache_creation_input_tokens"], ledger["cache_read_input_tokens"]) == (prefix, 2 * prefix)


def test_prompt_cache_expires_after_its_ttl(client: anthropic.Anthropic, control: EmulatorControl) -> None:
    first = client.messages.create(**cached_request("a")["params"])
    assert first.usage.cache_creation is not None and first.usage.cache_creation.ephemeral_5m_input_tokens > 0
    assert client.messages.create(**cached_request("a")["params"]).usage.cache_read_input_tokens
    control.advance(301)
    assert client.messages.create(**cached_request("a")["params"]).usage.cache_creation_input_tokens
