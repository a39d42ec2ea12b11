"""Turns one queue row into one Messages request, or into a reason it can never be sent."""

from __future__ import annotations

import io
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from etl.config import Task

CUSTOM_ID_PREFIX = "q"
_PREFIX_LEN = len(CUSTOM_ID_PREFIX)
# A doc_key is part of the warehouse's primary key (doc_key, task). PostgreSQL refuses a btree entry
# over 2,704 bytes ("index row size ... exceeds btree version 4 maximum 2704"), which once let a long key
# be sent and billed and then stop every collect. 1,024 bytes of UTF-8 plus a task name of at most 128
# (config) stay far below it, on either database.
MAX_DOC_KEY_BYTES = 1024

# Characters that show nothing: a body made only of these (and whitespace) has nothing to summarise.
# Unicode format (Cf: U+200B zero width space, U+FEFF BOM, U+2060 word joiner...), separators, controls,
# and the fillers that are letters or symbols only by category.
INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp", "Cn", "Co", "Cs", "Mn", "Me"})
INVISIBLE_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")


def has_visible_text(text: str) -> bool:
    """Whether any character would show (stops at the first one that does: cheap for real text)."""
    return any(
        not ch.isspace()
        and ch not in INVISIBLE_CHARS
        and unicodedata.category(ch) not in INVISIBLE_CATEGORIES
        for ch in text
    )


def custom_id(queue_id: int, installation: str | None = None, intent: int | None = None) -> str:
    """The custom_id a queue row is sent under.

    `q<row>_<intent>_<installation>` (docs/survival.md "Who is who"): the row, the intent (batch record)
    that sends it and the installation (database) it belongs to, so that no other installation's batch
    and no other intent's batch of ours can ever read as this intent's. Without an installation: the
    legacy `q<row>`, written before issue 20 (batches in flight at the upgrade) and by the live path,
    which sends no batch.
    """
    if installation is None or intent is None:
        return f"{CUSTOM_ID_PREFIX}{queue_id}"
    return f"{CUSTOM_ID_PREFIX}{queue_id}{id_suffix(intent, installation)}"


class SentId(NamedTuple):
    """What a custom_id says about itself. `installation`/`intent` are None for a legacy `q<row>`.
    (A tuple: the collector parses one per result line.)"""

    queue_id: int
    intent: int | None = None
    installation: str | None = None


def parse_custom_id(cid: object) -> SentId | None:
    """The parts of a custom_id this etl writes; None for anything else (another sender's id)."""
    if not isinstance(cid, str) or not cid.startswith(CUSTOM_ID_PREFIX):
        return None
    parts = cid[_PREFIX_LEN:].split("_")
    if len(parts) == 3:
        row, intent, installation = parts
        if _digits(row) and _digits(intent) and _INSTALLATION.fullmatch(installation):
            return SentId(int(row), int(intent), installation)
        return None
    if len(parts) == 1 and _digits(parts[0]):
        return SentId(int(parts[0]))
    return None


def id_suffix(intent: int, installation: str) -> str:
    """What every custom_id one intent sends ends with (`_<intent>_<installation>`)."""
    return f"_{intent}_{installation}"


def row_of(cid: str, suffix: str) -> int | None:
    """The row of a custom_id that is exactly `q<digits>` + `suffix` (`id_suffix`), else None: the
    collector's shortcut for its own lines, the same answer `parse_custom_id` gives for them without
    splitting the id. Anything else (another intent's, another installation's, a zero-padded intent)
    is None here and left to `parse_custom_id`."""
    if not cid.endswith(suffix) or not cid.startswith(CUSTOM_ID_PREFIX):
        return None
    row = cid[_PREFIX_LEN : len(cid) - len(suffix)]
    return int(row) if _digits(row) else None


def queue_id_of(cid: str) -> int | None:
    sent = parse_custom_id(cid)
    return None if sent is None else sent.queue_id


def _digits(s: str) -> bool:
    return len(s) <= 19 and s.isascii() and s.isdigit()


_INSTALLATION = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class Row:
    id: int
    doc_key: str
    task: str
    body: Any
    metadata: Any


class Rejection(Exception):
    """The row can never be sent as it is; `reason` is what the user reads on the row."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text_problem(value: str, what: str) -> str | None:
    if "\x00" in value:
        return f"{what} contains NUL bytes (binary data?): only text can be sent"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{what} is not valid UTF-8 text (bad character at position {exc.start})"
    return None


def _metadata(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise Rejection(f"metadata is not valid JSON: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise Rejection(f"metadata must be a JSON object, got {type(raw).__name__}")
    return raw


def build_params(row: Row, tasks: Mapping[str, Task], max_body_bytes: int) -> dict[str, Any]:
    """The `params` of a batch request for this row. Raises `Rejection` with a readable reason."""
    task = tasks.get(row.task)
    if task is None:
        known = ", ".join(sorted(tasks)) or "none"
        raise Rejection(f"task {row.task!r} does not exist (configured tasks: {known})")
    body = row.body
    if body is None:
        raise Rejection("body is NULL")
    if isinstance(body, bytes):
        raise Rejection("body is binary data, not text")
    if not isinstance(body, str):
        body = str(body)
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_body_bytes:
        raise Rejection(f"body is {size:,} bytes; the limit is {max_body_bytes:,} (submit.max_body_bytes)")
    if not body.strip():
        raise Rejection("body is empty or only whitespace")
    problem = _text_problem(body, "body") or _text_problem(row.doc_key, "doc_key")
    if problem:
        raise Rejection(problem)
    if not has_visible_text(body):
        raise Rejection("body has only invisible characters (zero-width, BOM, format or space characters)")
    key_bytes = len(row.doc_key.encode("utf-8", "surrogatepass"))
    if key_bytes > MAX_DOC_KEY_BYTES:
        raise Rejection(
            f"doc_key is {key_bytes:,} bytes; the limit is {MAX_DOC_KEY_BYTES:,} "
            "(it is the warehouse's unique key, and the database cannot index a longer one)"
        )
    meta = _metadata(row.metadata)
    values: dict[str, Any] = {"body": body, "doc_key": row.doc_key, "task": task.name}
    missing = [f for f in task.metadata_fields if f not in meta]
    if missing:
        raise Rejection(
            f"metadata lacks {', '.join(repr(m) for m in missing)} required by the template of task {task.name!r}"
        )
    for name in task.metadata_fields:
        value = meta[name]
        values[name] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        problem = _text_problem(values[name], f"metadata field {name!r}")
        if problem:
            raise Rejection(problem)
    text = task.template.format_map(values)
    params: dict[str, Any] = {
        "model": task.model,
        "max_tokens": task.max_tokens,
        "messages": [{"role": "user", "content": text}],
    }
    if task.system:
        block: dict[str, Any] = {"type": "text", "text": task.system}
        if task.cache_system:
            block["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
        params["system"] = [block]
    if task.output_schema is not None:
        params["output_config"] = {"format": {"type": "json_schema", "schema": dict(task.output_schema)}}
    return params


def encode_request(cid: str, params: Mapping[str, Any]) -> bytes:
    """One element of the create body's `requests` array, as compact UTF-8 JSON bytes.

    orjson writes the same compact JSON as `json.dumps(..., ensure_ascii=False, separators=(",", ":"))`
    in a fifth of the time (15-24 % of a submit's CPU was this call). What it refuses (an integer over 64
    bits in an output schema, a lone surrogate) is encoded by the standard library as before; the one
    difference in what it accepts is the spelling of small floats (`1e-7` for `1e-07`), the same number.
    """
    request = {"custom_id": cid, "params": params}
    try:
        return orjson.dumps(request)
    except TypeError:
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def request_size(cid: str, params: Mapping[str, Any]) -> int:
    """`len(encode_request(cid, params))`: the estimator needs only the size."""
    return len(encode_request(cid, params))


def batch_body(parts: list[bytes]) -> bytes:
    return b'{"requests":[' + b",".join(parts) + b"]}"


BODY_OVERHEAD = len(batch_body([]))


class BatchBody:
    """The create body `{"requests":[...]}`, written into one buffer as each request is encoded.

    No list of encoded requests and no join: `finish` hands over the buffer's own bytes (BytesIO's
    `getvalue` returns its internal object when nothing else shares it), so the process holds the body
    once, plus the buffer's growth margin (an eighth), instead of three times (bench/RESULTS.md).
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._buf.write(b'{"requests":[')
        self.count = 0

    @property
    def size(self) -> int:
        """Bytes of the body as `finish` would return it now."""
        return self._buf.tell() + 2

    def fits(self, encoded: bytes, max_bytes: int) -> bool:
        return self.size + len(encoded) + (1 if self.count else 0) <= max_bytes

    def add(self, encoded: bytes) -> None:
        if self.count:
            self._buf.write(b",")
        self._buf.write(encoded)
        self.count += 1

    def finish(self) -> bytes:
        self._buf.write(b"]}")
        body = self._buf.getvalue()
        self._buf.close()
        return body
