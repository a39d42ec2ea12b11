"""The HTTP side of the emulator, on the standard library's ``ThreadingHTTPServer``.

HTTP/1.1 with keep-alive; JSON answers carry ``content-length``; the results stream uses chunked transfer
encoding, written in ~1 MB chunks generated on the fly. No third-party web framework: the emulator ships
with the product and must not add dependencies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from etl.emulator import control_api, model
from etl.emulator.clock import VirtualClock
from etl.emulator.control_api import json_body
from etl.emulator.faults import STREAM_ACTIONS, EndpointRule, Faults
from etl.emulator.limits import Limits, LiveSettings
from etl.emulator.state import ApiError, EmulatorState, error_body, new_id
from etl.emulator.streaming import CHUNK_BYTES, chunks, first_bytes

log = logging.getLogger("etl.emulator")

MAX_REQUESTS = 100_000
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
BASIC_ACTIONS = frozenset({"status", "reset", "spend_limit"})
ENDPOINT_ACTIONS = {
    "create": BASIC_ACTIONS | {"ambiguous"},
    "retrieve": BASIC_ACTIONS | {"not_found"},
    "results": BASIC_ACTIONS | STREAM_ACTIONS,
    "list": BASIC_ACTIONS | {"unordered"},
}


@dataclass(frozen=True)
class EmulatorConfig:
    """How to run the emulator. ``port=0`` picks a free port; ``require_key=None`` accepts any key."""

    host: str = "127.0.0.1"
    port: int = 8765
    processing_seconds: float = 3.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    state_file: Path | None = None
    seed: int = 0
    faults: Mapping[str, Any] | None = None
    start_time: datetime | None = None
    require_key: str | None = None
    live: LiveSettings = field(
        default_factory=LiveSettings
    )  # latency and rate limits of POST /v1/messages (see limits.py)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: EmulatorServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    request_id = ""

    # -- plumbing ----------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY the body waits for the client's
        # delayed ACK of the headers (Nagle): up to tens of milliseconds on every answer.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    @property
    def emulator(self) -> EmulatorServer:
        return self.server.emulator

    def _shift(self) -> timedelta:
        """The API clock offset fault: how far the API's clock is off the (virtual) truth."""
        return timedelta(seconds=self.emulator.faults.clock_offset_seconds)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header on the API's clock: virtual now plus the clock offset fault."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        return super().date_time_string((self.emulator.clock.now() + self._shift()).timestamp())

    def _origin(self) -> str:
        host = self.headers.get("Host")
        if not host:
            address, port = self.server.server_address[:2]
            host = f"{address!s}:{port}"
        return f"http://{host}"

    def _send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", self.request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(
        self, status: int, type_: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self._send_json(status, error_body(type_, message, self.request_id), headers)

    def _abort(self) -> None:
        """Close the connection without an answer, with a TCP RST (SO_LINGER 0)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 413 for one over ``max_request_bytes``."""
        limit = self.emulator.config.max_request_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body, size = read_chunked(self.rfile, limit)
        else:
            size = int(self.headers.get("Content-Length") or 0)
            if size > limit:
                left = size
                while left > 0:  # drain, so the client reads our answer rather than a reset
                    left -= len(self.rfile.read(min(left, CHUNK_BYTES)) or b"x" * left)
            body = self.rfile.read(size) if size <= limit else b""
        if size > limit:
            self._send_error(413, "request_too_large", f"Request exceeds the maximum size of {limit} bytes.")
            return None
        return body

    # -- dispatch ----------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self.request_id = new_id("req_")
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self._read_body() if method in ("POST", "PUT", "PATCH") else b""
            if body is None:
                return
            if path.startswith("/_emulator/"):
                self._send_json(200, control_api.answer(self.emulator, method, path, body))
                return
            route = self._route(method, path)
            if route is None:
                raise ApiError(404, "not_found_error", f"Not found: {method} {path}")
            endpoint, handler, batch_id = route
            if not self._authorized():
                return
            retrieves = self.emulator.state.note_retrieve(batch_id) if endpoint == "retrieve" else None
            rule = self.emulator.faults.match(
                endpoint, ENDPOINT_ACTIONS.get(endpoint, BASIC_ACTIONS), retrieves
            )
            if rule is not None and self._apply_fault(rule, batch_id):
                return
            handler(batch_id, body, query, rule)
        except ApiError as exc:
            self._send_error(exc.status, exc.type, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            log.exception("emulator_request_failed")
            self._send_error(500, "api_error", "Internal server error in the emulator.")

    def _route(self, method: str, path: str) -> tuple[str, Callable[..., None], str] | None:
        parts = path.strip("/").split("/")
        if parts[:2] != ["v1", "messages"]:
            return None
        rest = parts[2:]
        table: dict[tuple[str, int, str], tuple[str, Callable[..., None]]] = {
            ("POST", 0, ""): ("messages", self._messages),
            ("POST", 1, "count_tokens"): ("count_tokens", self._count_tokens),
            ("POST", 1, "batches"): ("create", self._create),
            ("GET", 1, "batches"): ("list", self._list),
            ("GET", 2, ""): ("retrieve", self._retrieve),
            ("DELETE", 2, ""): ("delete", self._delete),
            ("POST", 3, "cancel"): ("cancel", self._cancel),
            ("GET", 3, "results"): ("results", self._results),
        }
        if len(rest) >= 2 and rest[0] != "batches":
            return None
        key = (method, len(rest), rest[0] if len(rest) == 1 else rest[2] if len(rest) == 3 else "")
        found = table.get(key)
        if found is None:
            return None
        return found[0], found[1], rest[1] if len(rest) >= 2 else ""

    def _authorized(self) -> bool:
        key = self.headers.get("x-api-key")
        auth = self.headers.get("Authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            self._send_error(401, "authentication_error", "x-api-key header is required")
            return False
        required = self.emulator.config.require_key
        if required is not None and key != required:
            self._send_error(401, "authentication_error", "invalid x-api-key")
            return False
        return True

    def _apply_fault(self, rule: EndpointRule, batch_id: str) -> bool:
        """Act on an endpoint rule; True when the answer (or the lack of one) has been given."""
        log.info("emulator_fault endpoint=%s action=%s", rule.endpoint, rule.action)
        if rule.action == "reset":
            self._abort()
            return True
        if rule.action == "status":
            headers = {}
            if rule.status in (429, 529) or rule.retry_after is not None:
                headers["retry-after"] = f"{rule.retry_after if rule.retry_after is not None else 1:g}"
            type_ = ERROR_TYPES.get(
                rule.status, "api_error" if rule.status >= 500 else "invalid_request_error"
            )
            self._send_error(rule.status, type_, rule.message or f"Injected HTTP {rule.status}.", headers)
            return True
        if rule.action == "spend_limit":
            body = error_body(
                "rate_limit_error",
                rule.message or "You have reached your organization's enforced spend limit.",
                self.request_id,
            )
            body["error"]["details"] = {"error_code": "enforced_spend_limit_reached"}
            self._send_json(429, body, {"x-should-retry": "false"})
            return True
        if rule.action == "not_found":
            self._send_error(404, "not_found_error", f"Message Batch {batch_id} not found.")
            return True
        return False  # ambiguous and stream faults are applied by their handlers

    # -- endpoints ---------------------------------------------------------------------------------

    def _create(self, _id: str, body: bytes, _query: dict[str, str], rule: EndpointRule | None) -> None:
        requests = parse_create_body(json_body(body))
        batch = self.emulator.state.create(requests, self.headers.get("anthropic-version"))
        answer = batch.to_api(self._origin(), self.emulator.clock.now(), self._shift())
        if rule is not None and rule.action == "ambiguous":
            if rule.drop:
                self._abort()
                return
            time.sleep(rule.delay_seconds)
        self._send_json(200, answer)

    def _retrieve(self, batch_id: str, *_: Any) -> None:
        batch = self.emulator.state.get(batch_id)
        self._send_json(200, batch.to_api(self._origin(), self.emulator.clock.now(), self._shift()))

    def _list(self, _id: str, _body: bytes, query: dict[str, str], rule: EndpointRule | None) -> None:
        limit, after, before = list_query(query)
        page, has_more = self.emulator.state.list_page(limit, after, before)
        if rule is not None and rule.action == "unordered":  # the page's newest entry listed last (a tie
            page = page[1:] + page[:1]  # re-sorted, an API-side shuffle); the pages stay in order
        now, origin = self.emulator.clock.now(), self._origin()
        self._send_json(
            200,
            {
                "data": [b.to_api(origin, now, self._shift()) for b in page],
                "has_more": has_more,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            },
        )

    def _cancel(self, batch_id: str, *_: Any) -> None:
        batch = self.emulator.state.cancel(batch_id)
        self._send_json(200, batch.to_api(self._origin(), self.emulator.clock.now(), self._shift()))

    def _delete(self, batch_id: str, *_: Any) -> None:
        self.emulator.state.delete(batch_id)
        self._send_json(200, {"id": batch_id, "type": "message_batch_deleted"})

    def _results(
        self, batch_id: str, _body: bytes, _query: dict[str, str], rule: EndpointRule | None
    ) -> None:
        batch = self.emulator.state.results_batch(batch_id)
        self.send_response(200)
        self.send_header("content-type", "application/x-jsonl")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", self.request_id)
        self.end_headers()
        seed = self.emulator.config.seed
        breaks = rule is not None and rule.action == "break_at"
        for data in first_bytes(batch, seed, rule.at_byte) if rule and breaks else chunks(batch, seed, rule):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        if breaks:
            # FIN, not RST, so the bytes sent reach the client; the chunked body is incomplete, which the
            # client reports as a protocol error (even when every line arrived).
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
        elif rule is not None and rule.action == "stream_reset":
            self._abort()
        elif rule is not None and rule.action == "stall":
            time.sleep(rule.stall_seconds)
            self._abort()
        else:
            self.wfile.write(b"0\r\n\r\n")

    def _messages(self, _id: str, body: bytes, *_: Any) -> None:
        params = json_body(body)
        problem = model.validate_params(params, self.headers.get("anthropic-version"), in_batch=False)
        if problem is not None:
            raise ApiError(404 if problem.type == "not_found_error" else 400, problem.type, problem.message)
        emulator = self.emulator
        admitted, headers, why = emulator.limits.admit(emulator.clock.now())
        if not admitted:
            emulator.state.note_rate_limited()
            self._send_error(
                429,
                "rate_limit_error",
                f"This request would exceed your organization's rate limit: {why}.",
                headers,
            )
            return
        # Billed when received (a caller that dies waiting has still paid); then the latency, slept on
        # this request's own thread outside every lock.
        message = emulator.state.sync_message(params)
        usage = message["usage"]
        tokens = int(usage["input_tokens"]) + int(usage["output_tokens"])
        delay = emulator.limits.delay()
        if delay > 0:
            time.sleep(delay)
        self._send_json(200, message, emulator.limits.spent(emulator.clock.now(), tokens))

    def _count_tokens(self, _id: str, body: bytes, *_: Any) -> None:
        params = json_body(body)
        problem = model.validate_params(
            params, self.headers.get("anthropic-version"), in_batch=False, require_max_tokens=False
        )
        if problem is not None:
            raise ApiError(404 if problem.type == "not_found_error" else 400, problem.type, problem.message)
        self._send_json(200, {"input_tokens": model.count_tokens(params)})


def read_chunked(rfile: BufferedIOBase, limit: int) -> tuple[bytes, int]:
    """A chunked request body (only its first `limit` bytes kept) and its whole size."""
    parts: list[bytes] = []
    size = 0
    while True:
        length = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if length == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts), size
        size += length
        chunk = rfile.read(length)
        rfile.readline()
        if size <= limit:
            parts.append(chunk)


def list_query(query: dict[str, str]) -> tuple[int, str | None, str | None]:
    """The list endpoint's `limit`, `after_id` and `before_id`, checked as the API checks them."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise ApiError(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
    after, before = query.get("after_id"), query.get("before_id")
    if after and before:
        raise ApiError(400, "invalid_request_error", "after_id and before_id cannot both be given")
    return limit, after or None, before or None


def parse_create_body(document: Any) -> list[tuple[str, dict[str, Any]]]:
    """Validate a create body as the API does at create time; params are checked later."""

    def bad(message: str) -> ApiError:
        return ApiError(400, "invalid_request_error", message)

    if not isinstance(document, dict):
        raise bad("Input should be a valid dictionary")
    for key in document:
        if key != "requests":
            raise bad(f"{key}: Extra inputs are not permitted")
    raw = document.get("requests")
    if raw is None:
        raise bad("requests: Field required")
    if not isinstance(raw, list):
        raise bad("requests: Input should be a valid list")
    if not raw:
        raise bad("requests: List should have at least 1 item after validation, not 0")
    if len(raw) > MAX_REQUESTS:
        raise bad(f"requests: List should have at most {MAX_REQUESTS} items after validation, not {len(raw)}")
    seen: set[str] = set()
    requests: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad(f"requests.{i}: Input should be a valid dictionary")
        custom_id = item.get("custom_id")
        if custom_id is None:
            raise bad(f"requests.{i}.custom_id: Field required")
        if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
            raise bad(f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
        params = item.get("params")
        if params is None:
            raise bad(f"requests.{i}.params: Field required")
        if not isinstance(params, dict):
            raise bad(f"requests.{i}.params: Input should be a valid dictionary")
        extra = set(item) - {"custom_id", "params"}
        if extra:
            raise bad(f"requests.{i}.{sorted(extra)[0]}: Extra inputs are not permitted")
        if custom_id in seen:
            raise bad(f"custom_id's must be unique within a batch. Duplicate custom_id found: {custom_id}")
        seen.add(custom_id)
        requests.append((custom_id, params))
    return requests


class EmulatorServer:
    """The emulator: state plus an HTTP server, run in a background thread or in the foreground.

    ``with EmulatorServer(EmulatorConfig(port=0)) as emulator: ... emulator.base_url``
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.clock = VirtualClock(self.config.start_time)
        self.faults = Faults(self.config.seed)
        if self.config.faults is not None:
            self.faults.configure(self.config.faults, "replace")
        self.state = EmulatorState(
            self.clock,
            self.faults,
            processing_seconds=self.config.processing_seconds,
            seed=self.config.seed,
            state_file=self.config.state_file,
        )
        self.limits = Limits(self.config.live, self.config.seed)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        """Open the listening socket (``start`` and ``serve_forever`` call it)."""
        if self._httpd is None:
            self._httpd = _HTTPServer((self.config.host, self.config.port), _Handler)
            self._httpd.emulator = self

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the emulator is not started; call start() first")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EmulatorServer:
        """Serve in a daemon thread; returns self."""
        self.bind()
        assert self._httpd is not None
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="etl-emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` is called from another thread."""
        self.bind()
        assert self._httpd is not None
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
