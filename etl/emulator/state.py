"""Batches, the prompt cache and the billing ledger, evaluated lazily against the virtual clock.

A batch stores its parsed requests once. When virtual time passes its end (``created_at`` +
``processing_seconds``, or the end of a cancel, or ``expires_at``), the next access finalizes it: each
request gets a one-number result code (succeeded with or without cache, canceled, expired, invalid params,
or an injected error) and succeeded requests are billed. Result lines are generated from the stored
params and those codes while streaming, so a batch is never held twice in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import secrets
import string
import threading
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from etl.emulator import model
from etl.emulator.clock import VirtualClock, format_time, parse_time
from etl.emulator.faults import CUSTOM_ID_PLACEHOLDER, Faults, Outcome
from etl.emulator.limits import standard_cost

EXPIRY = timedelta(hours=24)
RETENTION = timedelta(days=29)
CANCEL_SECONDS = 1.0
"""Virtual seconds a ``canceling`` batch takes to end."""

SUCCEEDED, CACHE_WRITE, CACHE_READ, CANCELED, EXPIRED, INVALID = range(6)
INJECTED = 6
"""Codes >= INJECTED index ``Batch.injected`` (errors forced by outcome rules)."""

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


# Two base62 digits per divmod (least significant first, as one digit at a time would give them).
_PAIRS = [BASE62[n % 62] + BASE62[n // 62] for n in range(62 * 62)]


def _base62(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits = []
    for _ in range(4):  # the big number divided 4 times, then small ones: 6 digits a chunk
        number, chunk = divmod(number, 56_800_235_584)  # 62**6
        for _ in range(3):
            chunk, pair = divmod(chunk, 3844)
            digits.append(_PAIRS[pair])
    return "".join(digits)


def new_id(prefix: str) -> str:
    """``prefix`` + 24 random base62 characters, like ``msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d``."""
    return prefix + _base62(secrets.token_bytes(24))


def stable_id(prefix: str, *parts: str) -> str:
    """An id derived from ``parts``, so a result line is identical on every download."""
    return prefix + _base62(hashlib.blake2b("\x00".join(parts).encode(), digest_size=24).digest())


class ApiError(Exception):
    """An HTTP error answer: status, API error type and message."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


@dataclass
class Batch:
    id: str
    seq: int
    created_at: datetime
    api_version: str | None
    processing_seconds: float
    requests: list[tuple[str, dict[str, Any]]]
    cancel_initiated_at: datetime | None = None
    ended_at: datetime | None = None
    codes: array[int] | None = None
    injected: list[Outcome] = field(default_factory=list)
    retrieves: int = 0

    @property
    def expires_at(self) -> datetime:
        return self.created_at + EXPIRY

    @property
    def archive_at(self) -> datetime:
        return self.created_at + RETENTION

    def end_due(self) -> datetime:
        """When the batch ends if nothing else happens."""
        end = min(self.created_at + timedelta(seconds=self.processing_seconds), self.expires_at)
        if self.cancel_initiated_at is not None:
            end = min(end, self.cancel_initiated_at + timedelta(seconds=CANCEL_SECONDS))
        return end

    def status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def counts(self) -> dict[str, int]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.codes is None:
            counts["processing"] = len(self.requests)
            return counts
        for code in self.codes:
            name = (
                "succeeded"
                if code <= CACHE_READ
                else "canceled"
                if code == CANCELED
                else "expired"
                if code == EXPIRED
                else "errored"
                if code == INVALID
                else self.injected[code - INJECTED].type
            )
            counts["succeeded" if name == "raw" else name] += 1
        return counts

    def to_api(self, origin: str, now: datetime, shift: timedelta = timedelta()) -> dict[str, Any]:
        """The API's view at virtual `now`; every timestamp is written `shift` off (an API clock offset:
        the API's clock differs from the host's, its batches live on the true virtual time)."""
        archived = now >= self.archive_at

        def stamp(value: datetime) -> str:
            return format_time(value + shift)

        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status(),
            "request_counts": self.counts(),
            "created_at": stamp(self.created_at),
            "expires_at": stamp(self.expires_at),
            "ended_at": None if self.ended_at is None else stamp(self.ended_at),
            "cancel_initiated_at": None
            if self.cancel_initiated_at is None
            else stamp(self.cancel_initiated_at),
            "archived_at": stamp(self.archive_at) if archived else None,
            "results_url": None
            if self.ended_at is None
            else f"{origin}/v1/messages/batches/{self.id}/results",
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "created_at": format_time(self.created_at),
            "api_version": self.api_version,
            "processing_seconds": self.processing_seconds,
            "requests": self.requests,
            "cancel_initiated_at": None
            if self.cancel_initiated_at is None
            else format_time(self.cancel_initiated_at),
            "ended_at": None if self.ended_at is None else format_time(self.ended_at),
            "codes": None if self.codes is None else list(self.codes),
            "injected": [[o.type, o.error_type, o.message, o.line] for o in self.injected],
            "retrieves": self.retrieves,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Batch:
        return cls(
            id=raw["id"],
            seq=raw["seq"],
            created_at=parse_time(raw["created_at"]),
            api_version=raw["api_version"],
            processing_seconds=raw["processing_seconds"],
            requests=[(cid, params) for cid, params in raw["requests"]],
            cancel_initiated_at=None
            if raw["cancel_initiated_at"] is None
            else parse_time(raw["cancel_initiated_at"]),
            ended_at=None if raw["ended_at"] is None else parse_time(raw["ended_at"]),
            codes=None if raw["codes"] is None else array("H", raw["codes"]),
            injected=[Outcome(*o) for o in raw["injected"]],
            retrieves=raw.get("retrieves", 0),
        )


def empty_ledger() -> dict[str, Any]:
    return {
        "batches_created": 0,
        "requests_created": 0,
        "sync_messages": 0,
        "billed": {},
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "live": empty_live_ledger(),
    }


def empty_live_ledger() -> dict[str, Any]:
    """Live (`POST /v1/messages`) billing, kept apart from batch billing, at the standard rate.

    `billed` counts bills per request (a hash of its params: the same document sent twice is billed
    twice under one key); `rate_limited` counts the 429s the limits answered (nothing billed)."""
    return {
        "calls": 0,
        "billed": {},
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "standard_cost_usd": 0.0,
        "rate_limited": 0,
    }


def params_key(params: Mapping[str, Any]) -> str:
    """The live ledger's key for a request: equal params, equal key."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def error_body(type_: str, message: str, request_id: str | None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}


class EmulatorState:
    """All emulator state behind one lock; every public method first settles due transitions."""

    def __init__(
        self,
        clock: VirtualClock,
        faults: Faults,
        *,
        processing_seconds: float = 3.0,
        seed: int = 0,
        state_file: Path | None = None,
    ) -> None:
        self.clock = clock
        self.faults = faults
        self.processing_seconds = processing_seconds
        self.seed = seed
        self.state_file = state_file
        self.lock = threading.RLock()
        self.batches: dict[str, Batch] = {}
        self.ledger: dict[str, Any] = empty_ledger()
        self.cache: dict[str, datetime] = {}
        self._seq = 0
        if state_file is not None and state_file.exists():
            self._load(state_file)

    # -- persistence -------------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        raw = json.loads(path.read_text())
        self.batches = {b["id"]: Batch.from_json(b) for b in raw["batches"]}
        self.ledger = raw["ledger"]
        self.cache = {k: parse_time(v) for k, v in raw["cache"].items()}
        self._seq = raw["seq"]
        self.clock.advance(raw.get("clock_advanced", 0.0))

    def _save(self) -> None:
        if self.state_file is None:
            return
        document = {
            "seq": self._seq,
            "clock_advanced": self.clock.advanced_seconds,
            "batches": [b.to_json() for b in self.batches.values()],
            "ledger": self.ledger,
            "cache": {k: format_time(v) for k, v in self.cache.items()},
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with tmp.open("w") as handle:
            json.dump(document, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_file)

    # -- transitions -------------------------------------------------------------------------------

    def settle(self) -> datetime:
        """Finalize every batch whose end is due; returns the virtual now used."""
        with self.lock:
            now = self.clock.now()
            due = sorted(
                (b for b in self.batches.values() if b.ended_at is None and b.end_due() <= now),
                key=lambda b: (b.end_due(), b.seq),
            )
            for batch in due:
                self._finalize(batch)
            if due:
                self._save()
            return now

    def _processed_count(self, batch: Batch) -> tuple[int, int]:
        """How many requests were processed before the batch stopped, and the code of the rest."""
        total = len(batch.requests)
        natural_end = batch.created_at + timedelta(seconds=batch.processing_seconds)
        cutoff, rest = natural_end, SUCCEEDED
        if batch.expires_at < cutoff:
            cutoff, rest = batch.expires_at, EXPIRED
        if batch.cancel_initiated_at is not None and batch.cancel_initiated_at < cutoff:
            cutoff, rest = batch.cancel_initiated_at, CANCELED
        if cutoff >= natural_end or batch.processing_seconds <= 0:
            return total, rest
        fraction = (cutoff - batch.created_at).total_seconds() / batch.processing_seconds
        return max(0, min(total, math.floor(total * fraction))), rest

    def _finalize(self, batch: Batch) -> None:
        end = batch.end_due()
        processed, rest = self._processed_count(batch)
        codes = array("H", [rest]) * len(batch.requests)
        injected: dict[Outcome, int] = {}
        check_outcomes = self.faults.has_outcomes()
        for i in range(processed):
            custom_id, params = batch.requests[i]
            forced = self.faults.outcome_for(custom_id) if check_outcomes else None
            if forced is not None and forced.type == "raw":  # served as given, not billed (see docs)
                codes[i] = INJECTED + injected.setdefault(forced, len(injected))
                continue
            if forced is not None and forced.type != "succeeded":
                if forced.type == "errored":
                    codes[i] = INJECTED + injected.setdefault(forced, len(injected))
                else:
                    codes[i] = CANCELED if forced.type == "canceled" else EXPIRED
                continue
            if model.validate_params(params, batch.api_version, in_batch=True) is not None:
                codes[i] = INVALID
                continue
            split = model.split_prompt(params)
            cache = self._use_cache(params, end, split)
            codes[i] = {None: SUCCEEDED, "write": CACHE_WRITE, "read": CACHE_READ}[cache]
            self._bill(custom_id, params, cache, split)
        batch.injected = list(injected)
        batch.codes = codes
        batch.ended_at = end

    def _use_cache(
        self, params: Mapping[str, Any], at: datetime, split: model.PromptSplit | None = None
    ) -> str | None:
        split = split or model.split_prompt(params)
        if split.cache_key is None:
            return None
        ttl = timedelta(hours=1) if split.cache_ttl == "1h" else timedelta(minutes=5)
        expiry = self.cache.get(split.cache_key)
        self.cache[split.cache_key] = max(at + ttl, expiry or at)
        return "read" if expiry is not None and expiry > at else "write"

    def _bill(
        self,
        custom_id: str | None,
        params: Mapping[str, Any],
        cache: str | None,
        split: model.PromptSplit | None = None,
    ) -> dict[str, Any]:
        reply = model.make_reply(params)
        usage = model.usage(params, reply, cache, "batch", split)
        ledger = self.ledger
        if custom_id is not None:
            ledger["billed"][custom_id] = ledger["billed"].get(custom_id, 0) + 1
        for key in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ):
            ledger[key] += usage[key]
        return usage

    # -- operations --------------------------------------------------------------------------------

    def create(self, requests: list[tuple[str, dict[str, Any]]], api_version: str | None) -> Batch:
        with self.lock:
            now = self.settle()
            self._seq += 1
            batch = Batch(
                id=new_id("msgbatch_"),
                seq=self._seq,
                created_at=now,
                api_version=api_version,
                processing_seconds=self.processing_seconds,
                requests=requests,
            )
            self.batches[batch.id] = batch
            self.ledger["batches_created"] += 1
            self.ledger["requests_created"] += len(requests)
            self._save()
            self.settle()
            return batch

    def get(self, batch_id: str) -> Batch:
        with self.lock:
            self.settle()
            batch = self.batches.get(batch_id)
            if batch is None:
                raise ApiError(404, "not_found_error", f"Message Batch {batch_id} not found.")
            return batch

    def note_retrieve(self, batch_id: str) -> int:
        """Count a retrieve of a batch; returns how many came before (0 for an unknown id)."""
        with self.lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return 0
            batch.retrieves += 1
            return batch.retrieves - 1

    def list_page(self, limit: int, after_id: str | None, before_id: str | None) -> tuple[list[Batch], bool]:
        """A page of batches, newest first, skipping ones still hidden by ``list_delay_seconds``."""
        with self.lock:
            now = self.settle()
            delay = timedelta(seconds=self.faults.list_delay_seconds)
            visible = sorted(
                (b for b in self.batches.values() if b.created_at + delay <= now), key=lambda b: -b.seq
            )
            if after_id is not None:
                anchor = self.batches.get(after_id)
                if anchor is None:
                    return [], False
                older = [b for b in visible if b.seq < anchor.seq]
                return older[:limit], len(older) > limit
            if before_id is not None:
                anchor = self.batches.get(before_id)
                if anchor is None:
                    return [], False
                newer = [b for b in visible if b.seq > anchor.seq]
                return newer[-limit:], len(newer) > limit
            return visible[:limit], len(visible) > limit

    def cancel(self, batch_id: str) -> Batch:
        with self.lock:
            batch = self.get(batch_id)
            if batch.ended_at is None and batch.cancel_initiated_at is None:
                batch.cancel_initiated_at = self.clock.now()
                self._save()
                self.settle()
            return batch

    def delete(self, batch_id: str) -> None:
        with self.lock:
            batch = self.get(batch_id)
            if batch.ended_at is None:
                raise ApiError(
                    400,
                    "invalid_request_error",
                    f"Message Batch {batch_id} cannot be deleted while it is {batch.status()}; "
                    "cancel it and wait for it to end first.",
                )
            del self.batches[batch_id]
            self._save()

    def results_batch(self, batch_id: str) -> Batch:
        """The batch whose results may be streamed now, or the API's 404."""
        with self.lock:
            now = self.settle()
            batch = self.batches.get(batch_id)
            if batch is None:
                raise ApiError(404, "not_found_error", f"Message Batch {batch_id} not found.")
            if batch.ended_at is None:
                raise ApiError(404, "not_found_error", f"Message Batch {batch_id} has no available results.")
            if now >= batch.archive_at:
                raise ApiError(
                    404,
                    "not_found_error",
                    f"Message Batch {batch_id} was archived on {format_time(batch.archive_at)}; "
                    "its results are no longer available.",
                )
            return batch

    def sync_message(self, params: dict[str, Any]) -> dict[str, Any]:
        """A synchronous Message for valid params, billed to the ledger's live section (standard rate)."""
        with self.lock:
            now = self.settle()
            cache = self._use_cache(params, now)
            message = model.message(new_id("msg_"), params, cache, "standard")
            self.ledger["sync_messages"] += 1
            live = self.ledger.setdefault("live", empty_live_ledger())
            live["calls"] += 1
            key = params_key(params)
            live["billed"][key] = live["billed"].get(key, 0) + 1
            usage = message["usage"]
            for name in (
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            ):
                live[name] += usage[name]
            live["standard_cost_usd"] += standard_cost(message["model"], usage)
            self._save()
        return message

    def note_rate_limited(self) -> None:
        with self.lock:
            live = self.ledger.setdefault("live", empty_live_ledger())
            live["rate_limited"] += 1

    def reset(self) -> None:
        with self.lock:
            self.batches.clear()
            self.cache.clear()
            self.ledger = empty_ledger()
            self.faults.clear()
            self.clock.reset()
            self._save()

    def ledger_json(self) -> dict[str, Any]:
        with self.lock:
            self.settle()
            return json.loads(json.dumps(self.ledger))  # type: ignore[no-any-return]


def result_lines(batch: Batch, seed: int) -> Iterator[bytes]:
    """The batch's JSONL result lines (each ending in LF) in a shuffled order fixed by the seed."""
    codes = batch.codes
    assert codes is not None
    order = list(range(len(batch.requests)))
    random.Random(f"{seed}:{batch.id}").shuffle(order)
    slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def dumps(line: dict[str, Any]) -> bytes:
        """orjson: the same compact UTF-8 line as the standard library in a fifth of the time; what it
        refuses (an integer over 64 bits) is written by the standard library, as before."""
        try:
            return orjson.dumps(line) + b"\n"
        except TypeError:
            return (slow(line) + "\n").encode()

    caches = {SUCCEEDED: None, CACHE_WRITE: "write", CACHE_READ: "read"}
    for i in order:
        custom_id, params = batch.requests[i]
        code = codes[i]
        result: dict[str, Any]
        if code <= CACHE_READ:
            msg_id = stable_id("msg_", batch.id, custom_id)
            result = {"type": "succeeded", "message": model.message(msg_id, params, caches[code], "batch")}
        elif code == CANCELED:
            result = {"type": "canceled"}
        elif code == EXPIRED:
            result = {"type": "expired"}
        else:
            if code == INVALID:
                problem = model.validate_params(params, batch.api_version, in_batch=True)
                assert problem is not None
                type_, message = problem.type, problem.message
            else:
                forced = batch.injected[code - INJECTED]
                if forced.type == "raw":
                    cid = json.dumps(custom_id)[1:-1]
                    yield (forced.line.replace(CUSTOM_ID_PLACEHOLDER, cid) + "\n").encode(
                        "utf-8", "surrogatepass"
                    )
                    continue
                type_, message = forced.error_type, forced.message
            result = {"type": "errored", "error": error_body(type_, message, None)}
        yield dumps({"custom_id": custom_id, "result": result})
