"""Every table, declared once. Migrations in `etl/store/migrations/` must produce exactly this."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import DateTime, TypeDecorator

from etl.clock import ensure_utc
from etl.store.dialect import capabilities


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python on both databases (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = ensure_utc(value)
        return value if capabilities(dialect).tz_aware_timestamps else value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return as_utc(value)


def as_utc(value: Any) -> datetime | None:
    """A stored timestamp as the driver returns it (SQLite: naive UTC text; PostgreSQL: a datetime) as an
    aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return ensure_utc(value)


MONEY_SCALE = 10  # money is kept to 10**-10 USD: exact for every price the API publishes
MONEY_UNIT = Decimal(1).scaleb(-MONEY_SCALE)


def to_money(value: Decimal | int | str) -> Decimal:
    """`value` in USD as the stored money: a Decimal with `MONEY_SCALE` places (half-even rounding)."""
    return Decimal(value).quantize(MONEY_UNIT, rounding=ROUND_HALF_EVEN)


class MoneyUnits(int):
    """An amount as an integer count of `MONEY_UNIT` (10**-10 USD): how the collector prices a result, so
    the hot path makes no Decimal (bench/RESULTS.md). `Money` stores it as it is on SQLite and as its
    exact decimal text on PostgreSQL; `usd` is the Decimal it stands for."""

    __slots__ = ()

    def usd(self) -> Decimal:
        return Decimal(int(self)).scaleb(-MONEY_SCALE)


_MONEY_TEXT = f"%de-{MONEY_SCALE}"


def money_text(value: Any) -> Any:
    """A `MoneyUnits` as the exact decimal text PostgreSQL's COPY reads into a NUMERIC ("1234567e-10" is
    0.0001234567: numeric input takes an exponent, exactly); anything else as is."""
    if type(value) is MoneyUnits:
        return _MONEY_TEXT % value
    return value


class Money(TypeDecorator[Decimal]):
    """USD held exactly: `NUMERIC(22, 10)` on PostgreSQL, an INTEGER count of 10**-10 USD on SQLite.

    Python sees `Decimal` on both. SQLite's `SUM()` of integers is exact (it raises on overflow, at
    about 920 million USD), where a sum of REALs or of decimal text would go through floating point.
    """

    impl = Numeric(22, MONEY_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if capabilities(dialect).exact_numeric:
            return dialect.type_descriptor(Numeric(22, MONEY_SCALE, asdecimal=True))
        return dialect.type_descriptor(BigInteger())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if type(value) is MoneyUnits:
            return value.usd() if capabilities(dialect).exact_numeric else int(value)
        if isinstance(value, float):
            raise TypeError(f"money must be Decimal, int or str, not float ({value!r})")
        money = to_money(value)
        if capabilities(dialect).exact_numeric:
            return money
        return int(money.scaleb(MONEY_SCALE))

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if not capabilities(dialect).exact_numeric:
            if isinstance(value, float):  # a REAL written by hand: read as its shortest decimal form
                return to_money(Decimal(repr(value)).scaleb(-MONEY_SCALE))
            return Decimal(int(value)).scaleb(-MONEY_SCALE)
        return to_money(value)


class instant(ColumnElement[datetime]):
    """A timestamp column as a comparable instant, whatever text a user's plain SQL wrote into it.

    PostgreSQL parses every ISO form into `timestamptz` at INSERT, so there it is the column. SQLite keeps
    the text as written and compares it as text: `'2026-12-04T09:00:00Z'` or `'... 09:00:00+02:00'` sorts
    against the canonical `'2026-12-04 09:00:00.000000'` by characters, not by time. There a value that is
    not canonical UTC text to the microsecond (what SQLAlchemy writes) is normalised with `strftime` to the
    same shape (its milliseconds, then `000`), and text that is no time at all
    becomes `'9999-12-31'` (the batch's side), so it is NULL only where the column is."""

    inherit_cache = True

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(instant)
def _instant_default(element: instant, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(instant, "sqlite")
def _instant_sqlite(element: instant, compiler: Any, **kw: Any) -> str:
    col = compiler.process(element.column, **kw)
    norm = f"strftime('%Y-%m-%d %H:%M:%f', {col})"
    return (
        f"(CASE WHEN {col} IS NULL THEN NULL WHEN length({col}) = 26 AND substr({col}, 1, 23) = {norm} "
        f"THEN {col} ELSE coalesce({norm} || '000', '9999-12-31') END)"
    )


Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
Id = BigInteger().with_variant(Integer(), "sqlite")


class DocStatus(StrEnum):
    QUEUED = "queued"  # waiting for the next submit
    CLAIMED = "claimed"  # taken by a submit run into a batch intent, not yet known to be at the API
    SUBMITTED = "submitted"  # inside a batch the API accepted
    DONE = "done"  # result in the warehouse
    DEAD = "dead"  # gave up: reason and attempts on the row
    REJECTED = "rejected"  # bad input, never sent: reason on the row
    SUPERSEDED = "superseded"  # a newer queued row of the same (doc_key, task) replaced it before sending
    CALLING = "calling"  # taken by the live worker; its Messages call is recorded and may be in flight


class Mode(StrEnum):
    """`etl_queue.mode`: how a row asked to be sent (NULL: by its `due_by`, see etl/routing.py)."""

    LIVE = "live"  # now, through the Messages API (the shorthand for "due now")
    BATCH = "batch"  # the nightly batch, whatever its due_by (also written when the live path falls back)


class BatchStatus(StrEnum):
    CLAIMED = "claimed"  # rows assigned under a lease; nothing sent
    SENDING = "sending"  # fence passed, create call under way
    UNKNOWN = "unknown"  # create outcome ambiguous: must be reconciled, never re-sent
    SUBMITTED = "submitted"  # the API has it (batch_id recorded)
    ENDED = "ended"  # the API says ended; results not fully collected yet
    COLLECTED = "collected"  # every request accounted for
    RELEASED = "released"  # never reached the API; rows went back to the queue
    FAILED = "failed"  # the API refused the create; rows went back to the queue
    ARCHIVED = "archived"  # results vanished before collection; rows re-queued


DOC_STATUSES = tuple(s.value for s in DocStatus)
MODES = tuple(m.value for m in Mode)
# The rows the live worker looks at (etl/routing.py states the rule); its partial index holds only them.
LIVE_CANDIDATE = "status = 'queued' AND (mode = 'live' OR (mode IS NULL AND due_by IS NOT NULL))"
BATCH_STATUSES = tuple(s.value for s in BatchStatus)
OPEN_BATCH_STATUSES = (BatchStatus.SUBMITTED.value, BatchStatus.ENDED.value)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


metadata = MetaData()
warehouse_metadata = MetaData()

queue = Table(
    "etl_queue",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("doc_key", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("task", Text, nullable=False, server_default="default"),
    Column("metadata", Json, nullable=True),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False, server_default=DocStatus.QUEUED.value),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("reason", Text, nullable=True),
    Column("batch_ref", Id, ForeignKey("etl_batches.id", name="fk_etl_queue_batch"), nullable=True),
    Column("enqueued_at", UtcDateTime, nullable=False, server_default=func.current_timestamp()),
    Column("updated_at", UtcDateTime, nullable=True),
    Column("due_by", UtcDateTime, nullable=True),
    Column("mode", Text, nullable=True),
    Column("live_calls", Integer, nullable=False, server_default=text("0")),  # Messages calls recorded
    Column("call_started_at", UtcDateTime, nullable=True),  # a recorded live call without an outcome yet
    CheckConstraint(_in("status", DOC_STATUSES), name="ck_etl_queue_status"),
    CheckConstraint(_in("mode", MODES), name="ck_etl_queue_mode"),
    # Partial: only queued rows are in it, so the status changes of sent rows (submitted, done, dead...)
    # never touch it. That is most of the queue's write traffic.
    Index(
        "ix_etl_queue_claim",
        "priority",
        "id",
        postgresql_where=text("status = 'queued'"),
        sqlite_where=text("status = 'queued'"),
    ),
    Index("ix_etl_queue_batch", "batch_ref"),
    # Only urgent queued rows: the live worker's look every poll interval never scans the nightly queue.
    Index(
        "ix_etl_queue_live",
        "due_by",
        postgresql_where=text(LIVE_CANDIDATE),
        sqlite_where=text(LIVE_CANDIDATE),
    ),
)

batches = Table(
    "etl_batches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("batch_id", Text, nullable=True, unique=True),
    Column("status", Text, nullable=False),
    Column("owner", Text, nullable=True),
    # The installation id its custom_ids carry (etl.prompt.custom_id); NULL: the legacy `q<row>` ids.
    Column("installation", Text, nullable=True),
    Column("lease_expires_at", UtcDateTime, nullable=True),
    Column("request_count", Integer, nullable=False, server_default=text("0")),
    Column("payload_bytes", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", UtcDateTime, nullable=False),
    Column("sent_at", UtcDateTime, nullable=True),
    Column("submitted_at", UtcDateTime, nullable=True),
    Column("remote_created_at", UtcDateTime, nullable=True),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("collected_at", UtcDateTime, nullable=True),
    Column("processing_status", Text, nullable=True),
    Column("request_counts", Json, nullable=True),
    Column("error", Text, nullable=True),
    Column("adopted", Integer, nullable=False, server_default=text("0")),
    # The newest batch already recorded when this intent was fenced: the API's list read down past it has
    # shown every batch this intent's create could have made (reconciler, docs/survival.md).
    Column("anchor_batch_id", Text, nullable=True),
    CheckConstraint(_in("status", BATCH_STATUSES), name="ck_etl_batches_status"),
    Index("ix_etl_batches_status", "status"),
)

events = Table(
    "etl_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", Text, nullable=False),
    Column("task", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("documents", Integer, nullable=False, server_default=text("0")),
    Column("input_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("output_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cache_write_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cache_read_tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cost_usd", Money, nullable=False, server_default=text("0")),
    Column("standard_cost_usd", Money, nullable=False, server_default=text("0")),
    Column("batch_ref", Id, nullable=True),
    Index("ix_etl_events_at", "at"),
)

# The nightly budget: what each batch was estimated to cost before it was sent, one row per task in it.
# A batch's rows count against the night's cap unless the batch never reached the API (released,
# failed), so a crash or a refused create gives its reservation back by its status alone.
spend = Table(
    "etl_spend",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column(
        "batch_ref",
        Id,
        ForeignKey("etl_batches.id", name="fk_etl_spend_batch", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("night", Text, nullable=False),
    Column("task", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("documents", Integer, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("max_output_tokens", BigInteger, nullable=False),
    Column("estimated_usd", Money, nullable=False),
    Column("reserved_usd", Money, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("ix_etl_spend_night", "night"),
    Index("ix_etl_spend_batch", "batch_ref"),
)

runs = Table(
    "etl_runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("job", Text, nullable=False),
    Column("slot", UtcDateTime, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("host", Text, nullable=True),
    Column("started_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("outcome", Text, nullable=False, server_default="running"),
    Column("detail", Text, nullable=True),
    # 1 for the scheduled run; a crashed, interrupted or partial run is re-run as attempt 2, 3...
    Column("attempt", Integer, nullable=False, server_default=text("1")),
    UniqueConstraint("job", "slot", "attempt", name="uq_etl_runs_job_slot_attempt"),
)

reports = Table(
    "etl_reports",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("period_start", UtcDateTime, nullable=True),
    Column("body", Json, nullable=False),
)

state = Table(
    "etl_state",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=True),
    Column("holder", Text, nullable=True),
    Column("expires_at", UtcDateTime, nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
)

results = Table(
    "etl_results",
    warehouse_metadata,
    Column("doc_key", Text, primary_key=True),
    Column("task", Text, primary_key=True),
    Column("queue_id", BigInteger, nullable=False),
    Column("custom_id", Text, nullable=False),
    Column("output_text", Text, nullable=True),
    Column("output_json", Json, nullable=True),
    Column("model", Text, nullable=True),
    Column("stop_reason", Text, nullable=True),
    Column("input_tokens", Integer, nullable=False, server_default=text("0")),
    Column("output_tokens", Integer, nullable=False, server_default=text("0")),
    Column("cache_creation_input_tokens", Integer, nullable=False, server_default=text("0")),
    Column("cache_read_input_tokens", Integer, nullable=False, server_default=text("0")),
    Column("cost_usd", Money, nullable=False, server_default=text("0")),
    Column("standard_cost_usd", Money, nullable=False, server_default=text("0")),
    Column("batch_id", Text, nullable=False),
    Column("enqueued_at", UtcDateTime, nullable=True),
    Column("batch_ended_at", UtcDateTime, nullable=True),
    Column("collected_at", UtcDateTime, nullable=False),
    Column("mode", Text, nullable=False, server_default=Mode.BATCH.value),  # the path that answered
)

SCHEMA_VERSION_TABLE = "etl_alembic_version"
WAREHOUSE_VERSION_TABLE = "etl_warehouse_alembic_version"
