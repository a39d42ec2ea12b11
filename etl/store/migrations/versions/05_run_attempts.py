"""etl_runs.attempt: a crashed, interrupted or partial slot is re-run as a new attempt of the same slot.

Revision ID: 0004
Revises: 0005
Create Date: 2026-12-02

Existing rows become attempt 1; UNIQUE(job, slot) becomes UNIQUE(job, slot, attempt). Rows still
`running` from before the upgrade are left as they are: the daemon marks them `crashed` when their owner
is known dead (an upgrade is done with the service stopped).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        with op.batch_alter_table("etl_runs") as batch:
            batch.add_column(sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("1")))
            batch.drop_constraint("uq_etl_runs_job_slot", type_="unique")
            batch.create_unique_constraint("uq_etl_runs_job_slot_attempt", ["job", "slot", "attempt"])


def downgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        op.execute("DELETE FROM etl_runs WHERE attempt > 1")
        with op.batch_alter_table("etl_runs") as batch:
            batch.drop_constraint("uq_etl_runs_job_slot_attempt", type_="unique")
            batch.create_unique_constraint("uq_etl_runs_job_slot", ["job", "slot"])
            batch.drop_column("attempt")
