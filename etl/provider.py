"""The Batches API seam: the only module that imports `anthropic`.

Every SDK exception is translated here into `ProviderError` with a `kind` that tells the caller what it
may do next. Creates are sent with `max_retries=0`: the API takes no idempotency key, so a retried
create that the server had already accepted would be a second, billed batch.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx2
from anthropic.types import MessageTokensCount
from anthropic.types.messages import MessageBatch

from etl import codec
from etl.clock import ensure_utc
from etl.errors import ProviderError, ResultsGone, ResultsIncomplete
from etl.remote import RemoteBatch

SYSTEMIC_ERROR_CODES = {"enforced_spend_limit_reached", "contract_spend_limit_reached"}
AMBIGUOUS_STATUSES = {408, 409, 500, 502, 503, 504, 529}


def _remote(batch: MessageBatch) -> RemoteBatch:
    counts = batch.request_counts
    return RemoteBatch(
        id=batch.id,
        processing_status=batch.processing_status,
        request_counts={
            "processing": counts.processing,
            "succeeded": counts.succeeded,
            "errored": counts.errored,
            "canceled": counts.canceled,
            "expired": counts.expired,
        },
        created_at=ensure_utc(batch.created_at),
        expires_at=ensure_utc(batch.expires_at) if batch.expires_at else None,
        ended_at=ensure_utc(batch.ended_at) if batch.ended_at else None,
        archived_at=ensure_utc(batch.archived_at) if batch.archived_at else None,
        cancel_initiated_at=ensure_utc(batch.cancel_initiated_at) if batch.cancel_initiated_at else None,
        results_url=batch.results_url,
    )


def _error_code(exc: anthropic.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            details = err.get("details")
            if isinstance(details, dict) and isinstance(details.get("error_code"), str):
                return str(details["error_code"])
    return None


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    """`retry-after` in seconds: a number, or an HTTP date (RFC 9110); None when absent or unreadable."""
    value = exc.response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = (_aware(when) - _answered_at(exc.response.headers)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) and seconds < 7 * 86400 else None


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _answered_at(headers: Mapping[str, str]) -> datetime:
    """The answer's own `Date` (an HTTP-date `retry-after` is read against the API's clock, not ours)."""
    try:
        return _aware(email.utils.parsedate_to_datetime(headers.get("date", "")))
    except (TypeError, ValueError, IndexError):
        return datetime.now(UTC)


def translate(exc: Exception, what: str, *, mutating: bool) -> ProviderError:
    """Map an SDK/transport exception to a ProviderError. `mutating` calls turn doubt into 'ambiguous'."""
    doubt = "ambiguous" if mutating else "transient"
    if never_connected(exc):
        # No connection was ever made (refused, unresolvable, connect timeout): nothing was sent.
        return ProviderError(
            f"{what}: API unreachable, nothing sent: {exc.__cause__ or exc}", kind="unreachable"
        )
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderError(f"{what}: timed out", kind=doubt)
    if isinstance(exc, anthropic.APIConnectionError):
        return ProviderError(f"{what}: connection failed: {exc.__cause__ or exc}", kind=doubt)
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        message = f"{what}: HTTP {status}: {exc.message}"
        code = _error_code(exc)
        if status == 429 and code in SYSTEMIC_ERROR_CODES:
            return ProviderError(
                f"{what}: spend limit reached ({code}); submission paused", kind="systemic", status=status
            )
        if status in (401, 402, 403):
            return ProviderError(message, kind="systemic", status=status)
        if status == 429:
            return ProviderError(message, kind="rate_limited", status=status, retry_after=_retry_after(exc))
        if status == 404:
            return ProviderError(message, kind="not_found", status=status)
        if status in AMBIGUOUS_STATUSES or status >= 500:
            return ProviderError(message, kind=doubt, status=status, retry_after=_retry_after(exc))
        return ProviderError(message, kind="rejected", status=status)
    if isinstance(exc, (httpx2.HTTPError, OSError)):
        return ProviderError(f"{what}: {type(exc).__name__}: {exc}", kind=doubt)
    if isinstance(exc, anthropic.AnthropicError):
        return ProviderError(f"{what}: {exc}", kind="rejected")
    raise exc


def never_connected(exc: BaseException) -> bool:
    """The call failed before a connection existed, so no byte of the request left this host.

    httpx raises `ConnectError`/`ConnectTimeout` only while opening a connection (TCP or TLS); a reset or
    timeout after the request was written is a `ReadError`/`WriteError`/`RemoteProtocolError`/
    `ReadTimeout`, which stays "outcome unknown" for a create."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.UnsupportedProtocol)):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


RATE_LIMIT_HEADERS = ("retry-after", "anthropic-ratelimit-", "x-should-retry")


@dataclass(frozen=True)
class LiveReply:
    """One Messages API answer: the Message as JSON, and the rate-limit headers that came with it."""

    message: dict[str, Any]
    headers: dict[str, str]


def _limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(RATE_LIMIT_HEADERS)}


class Provider:
    """A thin, typed wrapper over `anthropic.Anthropic` for the calls the daemon makes."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        create_timeout: float = 300.0,
        read_retries: int = 2,
    ) -> None:
        self._client = anthropic.Anthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=read_retries
        )
        self._create_timeout = create_timeout
        self._timeout = timeout

    def close(self) -> None:
        self._client.close()

    def create_batch(self, body: bytes) -> RemoteBatch:
        """POST a pre-encoded `{"requests": [...]}` body exactly once. Never retried here."""
        try:
            batch = self._client.post(
                "/v1/messages/batches",
                content=body,
                cast_to=MessageBatch,
                options={
                    "max_retries": 0,
                    "timeout": self._create_timeout,
                    "headers": {"content-type": "application/json"},
                },
            )
        except Exception as exc:  # translated: every failure has a kind the caller must act on
            error = translate(exc, "create batch", mutating=True)
            if error.status == 404:
                # The create endpoint always exists: a 404 is a wrong base URL, never a busy API.
                raise ProviderError(
                    f"create batch: HTTP 404 from {self._client.base_url}: the API has no such endpoint, so the "
                    "base URL (ANTHROPIC_BASE_URL or api.base_url) is wrong; give the origin only, e.g. "
                    "https://api.anthropic.com, without /v1",
                    kind="misconfigured",
                    status=404,
                ) from exc
            raise error from exc
        return _remote(batch)

    def create_message(self, params: Mapping[str, Any]) -> LiveReply:
        """POST /v1/messages once (the live path). Never retried here: the API takes no idempotency key,
        so the caller records each call before it leaves and decides about retrying.

        A failure is a `ProviderError` whose `headers` carry `retry-after` and `anthropic-ratelimit-*`.
        """
        try:
            response = self._client.post(
                "/v1/messages",
                body=dict(params),
                cast_to=httpx2.Response,
                options={"max_retries": 0, "timeout": self._timeout},
            )
        except Exception as exc:  # translated: every failure has a kind the caller must act on
            error = translate(exc, "live message", mutating=True)
            if isinstance(exc, anthropic.APIStatusError):
                error.headers = _limit_headers(exc.response.headers)
            raise error from exc
        try:
            message = codec.loads(response.content)
        except ValueError as exc:
            raise ProviderError("live message: the answer is not JSON", kind="ambiguous") from exc
        if not isinstance(message, dict):
            raise ProviderError("live message: the answer is not a JSON object", kind="ambiguous")
        return LiveReply(message, _limit_headers(response.headers))

    def count_tokens(self, params: Mapping[str, Any]) -> int:
        """`POST /v1/messages/count_tokens` (free, rate-limited) for a request's params; `max_tokens` is dropped."""
        body = {k: v for k, v in params.items() if k != "max_tokens"}
        try:
            counted = self._client.post(
                "/v1/messages/count_tokens", body=body, cast_to=MessageTokensCount, options={"max_retries": 0}
            )
        except Exception as exc:
            raise translate(exc, "count tokens", mutating=False) from exc
        return int(counted.input_tokens)

    def retrieve(self, batch_id: str) -> RemoteBatch:
        try:
            return _remote(self._client.messages.batches.retrieve(batch_id))
        except Exception as exc:
            raise translate(exc, f"retrieve {batch_id}", mutating=False) from exc

    def cancel(self, batch_id: str) -> RemoteBatch:
        try:
            return _remote(self._client.messages.batches.cancel(batch_id))
        except Exception as exc:
            raise translate(exc, f"cancel {batch_id}", mutating=True) from exc

    def list_pages(self, page_size: int = 100) -> Iterator[list[RemoteBatch]]:
        """The API's batch list a page at a time (newest first by creation, between pages; the order
        inside a page is not relied on: etl.reconciler), fetched as the caller reads on."""
        try:
            for page in self._client.messages.batches.list(limit=page_size).iter_pages():
                yield [_remote(batch) for batch in page.data]
        except Exception as exc:
            raise translate(exc, "list batches", mutating=False) from exc

    def result_custom_ids(self, batch_id: str, stall_timeout: float) -> Generator[str | None, None, None]:
        """The custom_id of each results line of an ended batch, in stream order (None for a line without
        a readable one). Raises what `iter_result_lines` raises; close it to stop reading early."""
        lines = self.iter_result_lines(batch_id, stall_timeout)
        try:
            for line in lines:
                try:
                    value = codec.loads(line).get("custom_id")
                except (ValueError, AttributeError):
                    value = None
                yield value if isinstance(value, str) else None
        finally:
            lines.close()

    def iter_result_lines(self, batch_id: str, stall_timeout: float) -> Generator[bytes, None, None]:
        """Yield each raw JSONL line of a batch's results, CRLF and blank lines tolerated.

        Raises `ResultsIncomplete` when the stream breaks or stalls, and `ResultsGone` when the results
        are no longer available (archived). A stream that ends early *without* an error is not detected
        here: the caller counts results against what it sent.
        """
        api = self._client.with_options(timeout=httpx2.Timeout(stall_timeout, connect=10.0))
        try:
            with api.messages.batches.with_streaming_response.results(batch_id) as response:
                buffer = b""
                for chunk in response.iter_bytes(1 << 16):
                    buffer += chunk
                    lines = buffer.split(b"\n")
                    buffer = lines.pop()
                    for line in lines:
                        line = line.rstrip(b"\r")
                        if line.strip():
                            yield line
                if buffer.strip():
                    yield buffer.rstrip(b"\r")
        except anthropic.NotFoundError as exc:
            raise ResultsGone(f"results of {batch_id} are not available: {exc.message}") from exc
        except anthropic.AnthropicError as exc:
            if isinstance(exc, anthropic.APIStatusError) and exc.status_code in (401, 403):
                raise translate(exc, f"results {batch_id}", mutating=False) from exc
            if (
                isinstance(exc, anthropic.APIStatusError)
                and 400 <= exc.status_code < 500
                and exc.status_code != 429
            ):
                raise ResultsGone(f"results of {batch_id}: HTTP {exc.status_code}: {exc.message}") from exc
            raise ResultsIncomplete(f"results of {batch_id}: {type(exc).__name__}: {exc}") from exc
        except (httpx2.HTTPError, OSError) as exc:
            raise ResultsIncomplete(f"results of {batch_id} broke off: {type(exc).__name__}: {exc}") from exc
