"""Schema migrations (Alembic), applied by `etl db upgrade` and checked at start-up.

The start-up check reads the version table with one query and compares it with `HEAD`, without
importing Alembic (a third of a second of every `etl` command otherwise); a test keeps `HEAD` equal to
the newest migration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

from etl import schema
from etl.errors import SchemaOutOfDate
from etl.store.engine import reachable

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

HEAD = "0004"  # the newest file in etl/migrations/versions


def _alembic_config(role: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "etl:migrations")
    cfg.attributes["role"] = role
    return cfg


def head_revision() -> str:
    """The newest migration, as Alembic finds it (`HEAD` must equal it)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("both")).get_current_head()
    assert head is not None
    return head


def roles(engine: Engine, warehouse: Engine) -> list[tuple[Engine, str]]:
    if engine.url == warehouse.url:
        return [(engine, "both")]
    return [(engine, "main"), (warehouse, "warehouse")]


def upgrade(engine: Engine, warehouse: Engine) -> list[tuple[str, str | None, str]]:
    """Bring both databases to the head revision. Returns (role, before, after) for each."""
    from alembic import command

    done = []
    for eng, role in roles(engine, warehouse):
        before = current_revision(eng, role)
        cfg = _alembic_config(role)
        with eng.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        done.append((role, before, current_revision(eng, role) or ""))
    return done


def current_revision(engine: Engine, role: str) -> str | None:
    name = schema.WAREHOUSE_VERSION_TABLE if role == "warehouse" else schema.SCHEMA_VERSION_TABLE
    with reachable(engine, "warehouse" if role == "warehouse" else "database"), engine.connect() as conn:
        if not inspect(conn).has_table(name):
            return None
        rows = conn.execute(text(f"SELECT version_num FROM {name}")).all()
    versions = sorted(str(r[0]) for r in rows)
    if len(versions) > 1:
        return ", ".join(versions)  # branched: never equal to HEAD, and said as it is
    return versions[0] if versions else None


def check(engine: Engine, warehouse: Engine) -> None:
    """Refuse to run on a schema older (or newer) than this code, saying which command fixes it."""
    head = HEAD
    for eng, role in roles(engine, warehouse):
        current = current_revision(eng, role)
        if current != head:
            where = eng.url.render_as_string(hide_password=True)
            state = "has no schema yet" if current is None else f"is at schema revision {current}"
            raise SchemaOutOfDate(
                f"the {'warehouse' if role == 'warehouse' else 'database'} {where} {state}; this version of etl "
                f"needs {head}. Run: etl db upgrade"
            )
