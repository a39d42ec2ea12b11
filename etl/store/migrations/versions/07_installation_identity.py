"""Issue 20: an installation has an identity, and each request carries it.

- `etl_batches.installation`: the installation id a batch's custom_ids carry (`q<row>_<intent>_<id>`);
  NULL for batches sent before this revision, whose custom_ids stay the legacy `q<row>` and keep
  being collected and reconciled as before.
- `etl_state['installation_id']`: 12 random hex digits, created once here (etl.store.state).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import secrets
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from etl.store.schema import UtcDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

KEY = "installation_id"


def upgrade(role: str = "both") -> None:
    if role not in ("main", "both"):
        return
    with op.batch_alter_table("etl_batches") as batch:
        batch.add_column(sa.Column("installation", sa.Text, nullable=True))
    bind = op.get_bind()
    state = sa.table(
        "etl_state",
        sa.column("key", sa.Text),
        sa.column("value", sa.Text),
        sa.column("updated_at", UtcDateTime),
    )
    if bind.execute(sa.select(state.c.key).where(state.c.key == KEY)).first() is None:
        bind.execute(
            sa.insert(state).values(key=KEY, value=secrets.token_hex(6), updated_at=datetime.now(UTC))
        )


def downgrade(role: str = "both") -> None:
    if role not in ("main", "both"):
        return
    with op.batch_alter_table("etl_batches") as batch:
        batch.drop_column("installation")
    op.execute(sa.text(f"DELETE FROM etl_state WHERE key = '{KEY}'"))
