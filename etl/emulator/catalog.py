"""The models the emulator knows: ids, aliases and maximum output tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_output_tokens: int


MODELS: dict[str, ModelInfo] = {
    info.id: info
    for info in (
        ModelInfo("claude-haiku-4-5-20251001", 64_000),
        ModelInfo("claude-sonnet-4-5-20250929", 64_000),
        ModelInfo("claude-sonnet-4-6", 64_000),
        ModelInfo("claude-opus-4-5-20251101", 64_000),
        ModelInfo("claude-opus-4-6", 128_000),
        ModelInfo("claude-opus-4-1-20250805", 32_000),
        ModelInfo("claude-opus-4-20250514", 32_000),
        ModelInfo("claude-sonnet-4-20250514", 64_000),
    )
}

ALIASES: dict[str, str] = {
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
}


def resolve_model(name: str) -> ModelInfo | None:
    """The model an id or alias names, or None when the API would answer not_found_error."""
    return MODELS.get(ALIASES.get(name, name))
