"""Least privilege (issue 24): on PostgreSQL a new `etl_queue` row must be queued, whoever inserts it.

Column-level INSERT grants (`etl db grants`) keep a producer from naming `status`, `attempts`, `batch_ref`
and the rest; this trigger holds for every role, the owner's included, so a row inserted as `submitted`
(stuck until someone notices) or already inside a batch or a live call is refused with a clear error.
The WHEN clause keeps ordinary inserts from calling the function at all. SQLite has no roles: whoever can
write the file can do anything (docs/deploy.md), so nothing is added there.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from alembic import op

from etl.store.dialect import capabilities

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

NOT_NEW = "NEW.status <> 'queued' OR NEW.batch_ref IS NOT NULL OR NEW.call_started_at IS NOT NULL"

UPGRADE = [
    """
    CREATE OR REPLACE FUNCTION etl_queue_insert_queued() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'etl_queue: a new row must be queued (status %, batch_ref %, call_started_at %)',
            NEW.status, coalesce(NEW.batch_ref::text, 'null'), coalesce(NEW.call_started_at::text, 'null')
            USING ERRCODE = 'check_violation', CONSTRAINT = 'etl_queue_insert_queued',
                  HINT = 'leave status, batch_ref and call_started_at out of the INSERT; etl sets them';
    END $$
    """,
    f"""
    CREATE TRIGGER etl_queue_insert_queued BEFORE INSERT ON etl_queue FOR EACH ROW
    WHEN ({NOT_NEW}) EXECUTE FUNCTION etl_queue_insert_queued()
    """,
]


def upgrade(role: str = "both") -> None:
    if role in ("main", "both") and capabilities(op.get_bind()).plpgsql:
        for statement in UPGRADE:
            op.execute(statement)


def downgrade(role: str = "both") -> None:
    if role in ("main", "both") and capabilities(op.get_bind()).plpgsql:
        op.execute("DROP TRIGGER IF EXISTS etl_queue_insert_queued ON etl_queue")
        op.execute("DROP FUNCTION IF EXISTS etl_queue_insert_queued()")
