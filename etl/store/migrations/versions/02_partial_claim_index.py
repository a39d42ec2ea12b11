"""Claim index only over queued rows, so status changes of sent rows do not maintain it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

QUEUED = sa.text("status = 'queued'")


def upgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        op.drop_index("ix_etl_queue_claim", table_name="etl_queue")
        op.create_index(
            "ix_etl_queue_claim",
            "etl_queue",
            ["priority", "id"],
            postgresql_where=QUEUED,
            sqlite_where=QUEUED,
        )


def downgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        op.drop_index("ix_etl_queue_claim", table_name="etl_queue")
        op.create_index("ix_etl_queue_claim", "etl_queue", ["status", "priority", "id"])
