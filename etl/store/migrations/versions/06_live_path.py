"""The live path (issue 15): `due_by` and `mode` on queue rows, the `calling` status, the path on results,
and on PostgreSQL the NOTIFY trigger that wakes the live worker on an urgent INSERT.

Existing rows keep today's behaviour: `due_by` and `mode` are NULL (routed to the batch), `live_calls` 0,
results are marked `batch`.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

from etl.store.dialect import capabilities
from etl.store.schema import UtcDateTime

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None

OLD_STATUS = "status IN ('queued', 'claimed', 'submitted', 'done', 'dead', 'rejected', 'superseded')"
NEW_STATUS = (
    "status IN ('queued', 'claimed', 'submitted', 'done', 'dead', 'rejected', 'superseded', 'calling')"
)
QUEUED = sa.text("status = 'queued'")
MODE = "mode IN ('live', 'batch')"
LIVE_CANDIDATE = "status = 'queued' AND (mode = 'live' OR (mode IS NULL AND due_by IS NOT NULL))"
CHANNEL = "etl_live"

# One NOTIFY per transaction however many urgent rows it inserts (PostgreSQL folds equal payloads); the
# WHEN clause keeps ordinary rows from calling the function at all, so bulk loads pay nothing.
TRIGGER_SQL = [
    f"""
    CREATE OR REPLACE FUNCTION etl_queue_notify_live() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', '');
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER etl_queue_live_insert AFTER INSERT ON etl_queue FOR EACH ROW
    WHEN (NEW.status = 'queued' AND (NEW.mode = 'live' OR (NEW.mode IS NULL AND NEW.due_by IS NOT NULL)))
    EXECUTE FUNCTION etl_queue_notify_live()
    """,
    """
    CREATE TRIGGER etl_queue_live_update AFTER UPDATE OF status, mode, due_by ON etl_queue FOR EACH ROW
    WHEN (NEW.status = 'queued' AND (NEW.mode = 'live' OR (NEW.mode IS NULL AND NEW.due_by IS NOT NULL)))
    EXECUTE FUNCTION etl_queue_notify_live()
    """,
]


def _claim_index() -> None:
    op.create_index(
        "ix_etl_queue_claim", "etl_queue", ["priority", "id"], postgresql_where=QUEUED, sqlite_where=QUEUED
    )


def _main() -> None:
    # As in 0003: the partial claim index is dropped around SQLite's table copy and made again after.
    op.drop_index("ix_etl_queue_claim", table_name="etl_queue")
    with op.batch_alter_table("etl_queue", recreate="auto") as batch:
        batch.add_column(sa.Column("due_by", UtcDateTime, nullable=True))
        batch.add_column(sa.Column("mode", sa.Text, nullable=True))
        batch.add_column(sa.Column("live_calls", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("call_started_at", UtcDateTime, nullable=True))
        batch.drop_constraint("ck_etl_queue_status", type_="check")
        batch.create_check_constraint("ck_etl_queue_status", sa.text(NEW_STATUS))
        batch.create_check_constraint("ck_etl_queue_mode", sa.text(MODE))
    _claim_index()
    where = sa.text(LIVE_CANDIDATE)
    op.create_index("ix_etl_queue_live", "etl_queue", ["due_by"], postgresql_where=where, sqlite_where=where)
    if capabilities(op.get_bind()).plpgsql:
        for statement in TRIGGER_SQL:
            op.execute(statement)


def _warehouse() -> None:
    with op.batch_alter_table("etl_results") as batch:
        batch.add_column(sa.Column("mode", sa.Text, nullable=False, server_default="batch"))


def upgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        _main()
    if role in ("warehouse", "both"):
        _warehouse()


def downgrade(role: str = "both") -> None:
    if role in ("warehouse", "both"):
        with op.batch_alter_table("etl_results") as batch:
            batch.drop_column("mode")
    if role in ("main", "both"):
        if capabilities(op.get_bind()).plpgsql:
            op.execute("DROP TRIGGER IF EXISTS etl_queue_live_insert ON etl_queue")
            op.execute("DROP TRIGGER IF EXISTS etl_queue_live_update ON etl_queue")
            op.execute("DROP FUNCTION IF EXISTS etl_queue_notify_live()")
        op.drop_index("ix_etl_queue_live", table_name="etl_queue")
        op.execute("UPDATE etl_queue SET status = 'queued' WHERE status = 'calling'")
        op.drop_index("ix_etl_queue_claim", table_name="etl_queue")
        with op.batch_alter_table("etl_queue", recreate="auto") as batch:
            batch.drop_constraint("ck_etl_queue_mode", type_="check")
            batch.drop_constraint("ck_etl_queue_status", type_="check")
            batch.create_check_constraint("ck_etl_queue_status", sa.text(OLD_STATUS))
            batch.drop_column("call_started_at")
            batch.drop_column("live_calls")
            batch.drop_column("mode")
            batch.drop_column("due_by")
        _claim_index()
