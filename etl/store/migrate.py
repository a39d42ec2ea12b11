"""Schema migrations (Alembic), applied by `etl db upgrade` and checked at start-up."""

from __future__ import annotations

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from etl import schema
from etl.errors import SchemaOutOfDate


def _alembic_config(role: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "etl:migrations")
    cfg.attributes["role"] = role
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config("both")).get_current_head()
    assert head is not None
    return head


def roles(engine: Engine, warehouse: Engine) -> list[tuple[Engine, str]]:
    if engine.url == warehouse.url:
        return [(engine, "both")]
    return [(engine, "main"), (warehouse, "warehouse")]


def upgrade(engine: Engine, warehouse: Engine) -> list[tuple[str, str | None, str]]:
    """Bring both databases to the head revision. Returns (role, before, after) for each."""
    done = []
    for eng, role in roles(engine, warehouse):
        before = current_revision(eng, role)
        cfg = _alembic_config(role)
        with eng.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        done.append((role, before, head_revision()))
    return done


def current_revision(engine: Engine, role: str) -> str | None:
    table = schema.WAREHOUSE_VERSION_TABLE if role == "warehouse" else schema.SCHEMA_VERSION_TABLE
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": table})
        return ctx.get_current_revision()


def check(engine: Engine, warehouse: Engine) -> None:
    """Refuse to run on a schema older (or newer) than this code, saying which command fixes it."""
    head = head_revision()
    for eng, role in roles(engine, warehouse):
        current = current_revision(eng, role)
        if current != head:
            where = eng.url.render_as_string(hide_password=True)
            state = "has no schema yet" if current is None else f"is at schema revision {current}"
            raise SchemaOutOfDate(
                f"the {'warehouse' if role == 'warehouse' else 'database'} {where} {state}; this version of etl "
                f"needs {head}. Run: etl db upgrade"
            )
