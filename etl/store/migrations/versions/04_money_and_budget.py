"""Money stored exactly, and the nightly budget's reservations.

- `cost_usd`, `standard_cost_usd` of `etl_results` and `etl_events`: NUMERIC(22, 10) on PostgreSQL, an
  INTEGER count of 10**-10 USD on SQLite (was double precision / REAL). Existing values are converted
  through their shortest decimal form (0.0041086 stays 0.0041086, not 0.00410859999...).
- money in saved reports (`etl_reports.body` -> `tokens_and_cost`) becomes decimal strings.
- new table `etl_spend`.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02
"""

from decimal import Decimal

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from etl.store.dialect import capabilities
from etl.store.schema import UtcDateTime

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None

SCALE = 10
MONEY_COLUMNS = ("cost_usd", "standard_cost_usd")
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(JSONB(), "postgresql")


def _to_exact(table: str) -> None:
    bind = op.get_bind()
    if capabilities(bind).exact_numeric:
        for name in MONEY_COLUMNS:
            # float8 -> numeric goes through the shortest decimal that reads back as the same double
            op.execute(
                f"ALTER TABLE {table} ALTER COLUMN {name} DROP DEFAULT, "
                f"ALTER COLUMN {name} TYPE NUMERIC(22, {SCALE}) USING round({name}::numeric, {SCALE}), "
                f"ALTER COLUMN {name} SET DEFAULT 0"
            )
        return
    # SQLite: convert the values in Python (repr gives the shortest decimal form), then the column type
    rows = bind.execute(sa.text(f"SELECT rowid, {', '.join(MONEY_COLUMNS)} FROM {table}")).all()
    converted = [
        {"rid": r[0], **{name: _units(value) for name, value in zip(MONEY_COLUMNS, r[1:], strict=True)}}
        for r in rows
    ]
    if converted:
        sets = ", ".join(f"{name} = :{name}" for name in MONEY_COLUMNS)
        bind.execute(sa.text(f"UPDATE {table} SET {sets} WHERE rowid = :rid"), converted)
    with op.batch_alter_table(table) as batch:
        for name in MONEY_COLUMNS:
            batch.alter_column(
                name,
                existing_type=sa.Float(),
                type_=sa.BigInteger(),
                existing_nullable=False,
                existing_server_default=sa.text("0"),
            )


def _units(value: object) -> int:
    if value is None:
        return 0
    exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    return int(exact.scaleb(SCALE).to_integral_value())


def _back_to_float(table: str) -> None:
    bind = op.get_bind()
    if capabilities(bind).exact_numeric:
        for name in MONEY_COLUMNS:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {name} TYPE DOUBLE PRECISION USING {name}::float8")
        return
    with op.batch_alter_table(table) as batch:
        for name in MONEY_COLUMNS:
            batch.alter_column(name, existing_type=sa.BigInteger(), type_=sa.Float(), existing_nullable=False)
    for name in MONEY_COLUMNS:
        op.execute(f"UPDATE {table} SET {name} = {name} / 1e{SCALE}")


def _reports_money_as_text() -> None:
    bind = op.get_bind()
    reports = sa.table("etl_reports", sa.column("id", sa.BigInteger), sa.column("body", Json))
    for rid, body in bind.execute(sa.select(reports.c.id, reports.c.body)).all():
        money = (body or {}).get("tokens_and_cost") if isinstance(body, dict) else None
        if not isinstance(money, dict):
            continue
        changed = False
        for key in ("cost_usd", "standard_cost_usd", "savings_usd"):
            value = money.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                money[key] = str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-SCALE)))
                changed = True
        if changed:
            bind.execute(sa.update(reports).where(reports.c.id == rid).values(body=body))


def upgrade(role: str = "both") -> None:
    if role in ("main", "both"):
        _to_exact("etl_events")
        _reports_money_as_text()
        op.create_table(
            "etl_spend",
            sa.Column("id", Id, primary_key=True, autoincrement=True),
            sa.Column(
                "batch_ref",
                Id,
                sa.ForeignKey("etl_batches.id", name="fk_etl_spend_batch", ondelete="CASCADE"),
                nullable=False,
            ),
            sa.Column("night", sa.Text, nullable=False),
            sa.Column("task", sa.Text, nullable=False),
            sa.Column("model", sa.Text, nullable=False),
            sa.Column("documents", sa.Integer, nullable=False),
            sa.Column("input_tokens", sa.BigInteger, nullable=False),
            sa.Column("max_output_tokens", sa.BigInteger, nullable=False),
            sa.Column(
                "estimated_usd",
                sa.Numeric(22, SCALE).with_variant(sa.BigInteger(), "sqlite"),
                nullable=False,
            ),
            sa.Column(
                "reserved_usd",
                sa.Numeric(22, SCALE).with_variant(sa.BigInteger(), "sqlite"),
                nullable=False,
            ),
            sa.Column("created_at", UtcDateTime, nullable=False),
        )
        op.create_index("ix_etl_spend_night", "etl_spend", ["night"])
        op.create_index("ix_etl_spend_batch", "etl_spend", ["batch_ref"])
    if role in ("warehouse", "both"):
        _to_exact("etl_results")


def downgrade(role: str = "both") -> None:
    if role in ("warehouse", "both"):
        _back_to_float("etl_results")
    if role in ("main", "both"):
        op.drop_index("ix_etl_spend_batch", table_name="etl_spend")
        op.drop_index("ix_etl_spend_night", table_name="etl_spend")
        op.drop_table("etl_spend")
        _back_to_float("etl_events")
