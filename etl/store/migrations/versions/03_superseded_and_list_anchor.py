"""Queue status `superseded`; each batch intent remembers the batch it was sent after.

- `etl_queue.status` may be `superseded`: an older queued row of a (doc_key, task) that a newer queued
  row replaced before it was sent. It is never sent (issue 12).
- `etl_batches.anchor_batch_id`: the newest batch already recorded when this intent was fenced. Its
  create reached the API before ours, so the API's list, newest first, read down past it has shown
  every batch our create could have made: the reconciler's proof that an unknown create made none,
  without comparing our clock with the API's (docs/survival.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OLD = "status IN ('queued', 'claimed', 'submitted', 'done', 'dead', 'rejected')"
NEW = "status IN ('queued', 'claimed', 'submitted', 'done', 'dead', 'rejected', 'superseded')"
QUEUED = sa.text("status = 'queued'")


def _check(allowed: str) -> None:
    # SQLite cannot alter a constraint: batch mode copies the table. The partial claim index is dropped
    # first and made again after, so the copy never has to reflect its WHERE clause.
    op.drop_index("ix_etl_queue_claim", table_name="etl_queue")
    with op.batch_alter_table("etl_queue", recreate="auto") as batch:
        batch.drop_constraint("ck_etl_queue_status", type_="check")
        batch.create_check_constraint("ck_etl_queue_status", sa.text(allowed))
    op.create_index(
        "ix_etl_queue_claim", "etl_queue", ["priority", "id"], postgresql_where=QUEUED, sqlite_where=QUEUED
    )


def upgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        _check(NEW)
        op.add_column("etl_batches", sa.Column("anchor_batch_id", sa.Text, nullable=True))


def downgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        op.execute("UPDATE etl_queue SET status = 'dead', reason = 'superseded' WHERE status = 'superseded'")
        with op.batch_alter_table("etl_batches") as batch:
            batch.drop_column("anchor_batch_id")
        _check(OLD)
