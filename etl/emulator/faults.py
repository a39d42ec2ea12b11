"""Fault injection: endpoint rules (errors, resets, ambiguous creates, broken result streams) and
per-request outcome rules.

A fault document is ``{"rules": [...], "outcomes": [...], "list_delay_seconds": S, "clock_offset_seconds": O}``;
see docs/emulator.md.
Endpoint rules with ``rate`` draw from one RNG seeded at start; outcome rules with ``rate`` hash the seed
and the custom_id, so a rerun with the same seed fails the same requests.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ENDPOINTS = frozenset(
    {"create", "retrieve", "list", "cancel", "delete", "results", "messages", "count_tokens", "*"}
)
ACTIONS = frozenset(
    {
        "status",
        "reset",
        "ambiguous",
        "not_found",
        "spend_limit",
        "truncate",
        "cut_line",
        "stream_reset",
        "stall",
        "break_at",
        "extra_line",
        "unordered",
    }
)
STREAM_ACTIONS = frozenset({"truncate", "cut_line", "stream_reset", "stall", "break_at", "extra_line"})
OUTCOMES = frozenset({"errored", "expired", "canceled", "succeeded", "raw"})
# In a "raw" outcome's line, replaced by the request's custom_id as a JSON string's content.
CUSTOM_ID_PLACEHOLDER = "{custom_id}"


class FaultConfigError(ValueError):
    """A fault document is malformed; the message says which rule and why."""


@dataclass(frozen=True)
class EndpointRule:
    endpoint: str
    action: str
    times: int | None = None
    rate: float = 1.0
    status: int = 500
    retry_after: float | None = None
    delay_seconds: float = 0.0
    drop: bool = False
    after_lines: int = 0
    stall_seconds: float = 0.0
    first_retrieves: int | None = None
    message: str | None = None
    at_byte: int = 0
    custom_id: str | None = None  # `extra_line`: the custom_id of the line added at the end of the results

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class OutcomeRule:
    custom_id: str
    outcome: str
    error_type: str = "api_error"
    message: str | None = None
    rate: float = 1.0
    line: str | None = None
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(self.custom_id))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "custom_id": self.custom_id,
            "outcome": self.outcome,
            "error_type": self.error_type,
        }
        out.update({"rate": self.rate} if self.rate != 1.0 else {})
        out.update({"message": self.message} if self.message is not None else {})
        out.update({"line": self.line} if self.line is not None else {})
        return out


def _number(raw: Mapping[str, Any], key: str, where: str, default: float | None) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise FaultConfigError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _rate(raw: Mapping[str, Any], where: str) -> float:
    rate = _number(raw, "rate", where, 1.0)
    assert rate is not None
    if rate > 1:
        raise FaultConfigError(f"{where}: rate must be between 0 and 1, got {rate}")
    return rate


def parse_rule(raw: Any, index: int) -> EndpointRule:
    where = f"rules[{index}]"
    if not isinstance(raw, Mapping):
        raise FaultConfigError(f"{where}: must be an object")
    endpoint, action = raw.get("endpoint", "*"), raw.get("action")
    if endpoint not in ENDPOINTS:
        raise FaultConfigError(f"{where}: endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
    if action not in ACTIONS:
        raise FaultConfigError(f"{where}: action must be one of {sorted(ACTIONS)}, got {action!r}")
    if action == "ambiguous" and endpoint != "create":
        raise FaultConfigError(f"{where}: action 'ambiguous' applies to endpoint 'create' only")
    if action == "not_found" and endpoint not in ("retrieve", "*"):
        raise FaultConfigError(f"{where}: action 'not_found' applies to endpoint 'retrieve' only")
    if action == "unordered" and endpoint != "list":
        raise FaultConfigError(f"{where}: action 'unordered' applies to endpoint 'list' only")
    if action == "extra_line" and not isinstance(raw.get("custom_id"), str):
        raise FaultConfigError(f"{where}: action 'extra_line' needs a custom_id (string)")
    if action in STREAM_ACTIONS and endpoint not in ("results", "*"):
        raise FaultConfigError(f"{where}: action {action!r} applies to endpoint 'results' only")
    unknown = set(raw) - {f for f in EndpointRule.__dataclass_fields__}
    if unknown:
        raise FaultConfigError(f"{where}: unknown keys {sorted(unknown)}")
    times = raw.get("times")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 0):
        raise FaultConfigError(f"{where}: times must be an integer >= 0, got {times!r}")
    status = raw.get("status", 500)
    if action == "status" and (not isinstance(status, int) or not 400 <= status <= 599):
        raise FaultConfigError(f"{where}: status must be an HTTP error status 400..599, got {status!r}")
    first = raw.get("first_retrieves")
    return EndpointRule(
        endpoint=endpoint,
        action=action,
        times=times,
        rate=_rate(raw, where),
        status=int(status),
        retry_after=_number(raw, "retry_after", where, None),
        delay_seconds=_number(raw, "delay_seconds", where, 0.0) or 0.0,
        drop=bool(raw.get("drop", False)),
        after_lines=int(_number(raw, "after_lines", where, 0.0) or 0),
        stall_seconds=_number(raw, "stall_seconds", where, 0.0) or 0.0,
        first_retrieves=None if first is None else int(first),
        message=raw.get("message"),
        at_byte=int(_number(raw, "at_byte", where, 0.0) or 0),
        custom_id=raw.get("custom_id"),
    )


def parse_outcome(raw: Any, index: int) -> OutcomeRule:
    where = f"outcomes[{index}]"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("custom_id"), str):
        raise FaultConfigError(f"{where}: must be an object with a custom_id regex")
    if raw.get("outcome") not in OUTCOMES:
        raise FaultConfigError(
            f"{where}: outcome must be one of {sorted(OUTCOMES)}, got {raw.get('outcome')!r}"
        )
    unknown = set(raw) - {"custom_id", "outcome", "error_type", "message", "rate", "line"}
    if unknown:
        raise FaultConfigError(f"{where}: unknown keys {sorted(unknown)}")
    if (raw["outcome"] == "raw") != isinstance(raw.get("line"), str):
        raise FaultConfigError(f"{where}: a 'line' (text) goes with outcome 'raw', and only with it")
    try:
        return OutcomeRule(
            custom_id=raw["custom_id"],
            outcome=raw["outcome"],
            error_type=str(raw.get("error_type", "api_error")),
            message=raw.get("message"),
            rate=_rate(raw, where),
            line=raw.get("line"),
        )
    except re.error as exc:
        raise FaultConfigError(f"{where}: custom_id is not a valid regex: {exc}") from exc


@dataclass(frozen=True)
class Outcome:
    """What an outcome rule decided for one request."""

    type: str
    error_type: str = "api_error"
    message: str = ""
    line: str = ""  # "raw": the results line(s) served as they are, custom_id filled in


class Faults:
    """The live fault configuration. Thread-safe; ``times`` counters are consumed as rules fire.

    Every rule and outcome rule counts its ``hits`` (the times it fired), shown by ``to_json``: a test
    that installs a rule can prove it fired, so a rule that matches nothing cannot pass unnoticed."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[EndpointRule] = []
        self._remaining: list[int | None] = []
        self._hits: list[int] = []
        self._outcomes: list[OutcomeRule] = []
        self._outcome_hits: list[int] = []
        self.list_delay_seconds = 0.0
        self.clock_offset_seconds = 0.0

    def configure(self, document: Any, mode: str = "replace") -> None:
        """Apply a fault document (``mode`` "replace" or "append"); raises FaultConfigError."""
        if not isinstance(document, Mapping):
            raise FaultConfigError("the fault document must be a JSON object")
        mode = str(document.get("mode", mode))
        if mode not in ("replace", "append"):
            raise FaultConfigError(f"mode must be 'replace' or 'append', got {mode!r}")
        unknown = set(document) - {"rules", "outcomes", "mode", "list_delay_seconds", "clock_offset_seconds"}
        if unknown:
            raise FaultConfigError(f"unknown keys {sorted(unknown)}")
        rules = [parse_rule(r, i) for i, r in enumerate(document.get("rules") or [])]
        outcomes = [parse_outcome(o, i) for i, o in enumerate(document.get("outcomes") or [])]
        delay = _number(document, "list_delay_seconds", "list_delay_seconds", None)
        offset = document.get("clock_offset_seconds")
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int | float)):
            raise FaultConfigError(
                f"clock_offset_seconds must be a number (seconds, any sign), got {offset!r}"
            )
        with self._lock:
            if mode == "replace":
                self._rules, self._remaining, self._outcomes = [], [], []
                self._hits, self._outcome_hits = [], []
                self.list_delay_seconds = 0.0
                self.clock_offset_seconds = 0.0
            self._rules.extend(rules)
            self._remaining.extend(r.times for r in rules)
            self._hits.extend(0 for _ in rules)
            self._outcomes.extend(outcomes)
            self._outcome_hits.extend(0 for _ in outcomes)
            if delay is not None:
                self.list_delay_seconds = delay
            if offset is not None:
                self.clock_offset_seconds = float(offset)

    def clear(self) -> None:
        self.configure({}, "replace")

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rules": [
                    {**r.to_json(), "remaining": left, "hits": hits}
                    for r, left, hits in zip(self._rules, self._remaining, self._hits, strict=True)
                ],
                "outcomes": [
                    {**o.to_json(), "hits": hits}
                    for o, hits in zip(self._outcomes, self._outcome_hits, strict=True)
                ],
                "list_delay_seconds": self.list_delay_seconds,
                "clock_offset_seconds": self.clock_offset_seconds,
            }

    def match(
        self, endpoint: str, actions: frozenset[str] | None = None, retrieves: int | None = None
    ) -> EndpointRule | None:
        """The first rule firing for this call, consuming one of its ``times``.

        ``retrieves`` is how many times the batch was retrieved before: a ``not_found`` rule with
        ``first_retrieves`` only fires for a batch's first that many retrieves.
        """
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.endpoint not in (endpoint, "*") or self._remaining[i] == 0:
                    continue
                if actions is not None and rule.action not in actions:
                    continue
                if rule.action == "not_found" and (
                    retrieves is None
                    or (rule.first_retrieves is not None and retrieves >= rule.first_retrieves)
                ):
                    continue
                if rule.rate < 1.0 and self._rng.random() >= rule.rate:
                    continue
                left = self._remaining[i]
                if left is not None:
                    self._remaining[i] = left - 1
                self._hits[i] += 1
                return rule
        return None

    def outcome_for(self, custom_id: str) -> Outcome | None:
        """The forced outcome of a request, deterministic given the seed and custom_id."""
        with self._lock:
            outcomes = list(self._outcomes)
        for index, rule in enumerate(outcomes):
            if not rule.pattern.fullmatch(custom_id):
                continue
            if rule.rate < 1.0:
                digest = hashlib.sha256(f"{self._seed}\x00{index}\x00{custom_id}".encode()).digest()
                if int.from_bytes(digest[:8], "big") / 2**64 >= rule.rate:
                    continue
            with self._lock:  # counted unless a reconfiguration replaced the rule meanwhile
                if index < len(self._outcomes) and self._outcomes[index] is rule:
                    self._outcome_hits[index] += 1
            message = rule.message or f"Injected {rule.error_type} for {custom_id}"
            return Outcome(rule.outcome, rule.error_type, message, rule.line or "")
        return None

    def has_outcomes(self) -> bool:
        with self._lock:
            return bool(self._outcomes)
