"""Initial schema: queue, batch intents, events, runs, reports, state; warehouse results.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from etl.store.schema import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

DOC = "status IN ('queued', 'claimed', 'submitted', 'done', 'dead', 'rejected')"
BATCH = (
    "status IN ('claimed', 'sending', 'unknown', 'submitted', 'ended', 'collected', 'released', 'failed', "
    "'archived')"
)


def _main() -> None:
    _batches()
    _queue()
    _events()
    _bookkeeping()


def _batches() -> None:
    op.create_table(
        "etl_batches",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.Text, nullable=True, unique=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("lease_expires_at", UtcDateTime, nullable=True),
        sa.Column("request_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("payload_bytes", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("sent_at", UtcDateTime, nullable=True),
        sa.Column("submitted_at", UtcDateTime, nullable=True),
        sa.Column("remote_created_at", UtcDateTime, nullable=True),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.Column("collected_at", UtcDateTime, nullable=True),
        sa.Column("processing_status", sa.Text, nullable=True),
        sa.Column("request_counts", Json, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("adopted", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.CheckConstraint(BATCH, name="ck_etl_batches_status"),
    )
    op.create_index("ix_etl_batches_status", "etl_batches", ["status"])


def _queue() -> None:
    op.create_table(
        "etl_queue",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("doc_key", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False, server_default="default"),
        sa.Column("metadata", Json, nullable=True),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("batch_ref", Id, sa.ForeignKey("etl_batches.id", name="fk_etl_queue_batch"), nullable=True),
        sa.Column("enqueued_at", UtcDateTime, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updated_at", UtcDateTime, nullable=True),
        sa.CheckConstraint(DOC, name="ck_etl_queue_status"),
    )
    op.create_index("ix_etl_queue_claim", "etl_queue", ["status", "priority", "id"])
    op.create_index("ix_etl_queue_batch", "etl_queue", ["batch_ref"])


def _events() -> None:
    op.create_table(
        "etl_events",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("at", UtcDateTime, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("documents", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("cache_write_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("cache_read_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("cost_usd", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("standard_cost_usd", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("batch_ref", Id, nullable=True),
    )
    op.create_index("ix_etl_events_at", "etl_events", ["at"])


def _bookkeeping() -> None:
    """Runs, reports and the key-value state."""
    op.create_table(
        "etl_runs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("slot", UtcDateTime, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=True),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("ended_at", UtcDateTime, nullable=True),
        sa.Column("outcome", sa.Text, nullable=False, server_default="running"),
        sa.Column("detail", sa.Text, nullable=True),
        sa.UniqueConstraint("job", "slot", name="uq_etl_runs_job_slot"),
    )
    op.create_table(
        "etl_reports",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("period_start", UtcDateTime, nullable=True),
        sa.Column("body", Json, nullable=False),
    )
    op.create_table(
        "etl_state",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=True),
        sa.Column("holder", sa.Text, nullable=True),
        sa.Column("expires_at", UtcDateTime, nullable=True),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )


def _warehouse() -> None:
    op.create_table(
        "etl_results",
        sa.Column("doc_key", sa.Text, primary_key=True),
        sa.Column("task", sa.Text, primary_key=True),
        sa.Column("queue_id", sa.BigInteger, nullable=False),
        sa.Column("custom_id", sa.Text, nullable=False),
        sa.Column("output_text", sa.Text, nullable=True),
        sa.Column("output_json", Json, nullable=True),
        sa.Column("model", sa.Text, nullable=True),
        sa.Column("stop_reason", sa.Text, nullable=True),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("cache_creation_input_tokens", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("cache_read_input_tokens", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("cost_usd", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("standard_cost_usd", sa.Float, nullable=False, server_default=sa.text("0")),
        sa.Column("batch_id", sa.Text, nullable=False),
        sa.Column("enqueued_at", UtcDateTime, nullable=True),
        sa.Column("batch_ended_at", UtcDateTime, nullable=True),
        sa.Column("collected_at", UtcDateTime, nullable=False),
    )


def upgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        _main()
    if role in ("warehouse", "both"):
        _warehouse()


def downgrade(role: str = "both") -> None:
    if role in ("warehouse", "both"):
        op.drop_table("etl_results")
    if role in ("main", "both"):
        for name in ("etl_state", "etl_reports", "etl_runs", "etl_events", "etl_queue", "etl_batches"):
            op.drop_table(name)
