"""Alembic environment: always driven programmatically by `etl.store.migrate` with a live connection."""

from __future__ import annotations

from alembic import context

from etl.store import schema
from etl.store.dialect import capabilities

config = context.config
connection = config.attributes["connection"]
role = config.attributes.get("role", "both")
version_table = schema.WAREHOUSE_VERSION_TABLE if role == "warehouse" else schema.SCHEMA_VERSION_TABLE
target = {"main": schema.metadata, "warehouse": schema.warehouse_metadata}.get(
    role, [schema.metadata, schema.warehouse_metadata]
)

context.configure(
    connection=connection,
    target_metadata=target,
    version_table=version_table,
    render_as_batch=not capabilities(connection).alter_in_place,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations(role=role)
