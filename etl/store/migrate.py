"""Schema migrations (Alembic), applied by `etl db upgrade` and checked at start-up.

The start-up check reads the version table with one query and compares it with `HEAD`, without
importing Alembic (a third of a second of every `etl` command otherwise); a test keeps `HEAD` equal to
the newest migration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from etl.errors import SchemaIncomplete, SchemaOutOfDate
from etl.store import schema
from etl.store.engine import reachable

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

# The newest migration of the chain. Revision ids are what databases store, so they stay as they were
# made: 0001 -> 0002 -> 0003 -> 0005 -> 0004 -> 0006 -> 0007 -> 0008 (two branches merged). The files in
# etl/store/migrations/versions/ are numbered in that run order (04_ holds revision 0005, 05_ 0004).
HEAD = "0008"


def _alembic_config(role: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "etl.store:migrations")
    cfg.attributes["role"] = role
    return cfg


def head_revision() -> str:
    """The newest migration, as Alembic finds it (`HEAD` must equal it)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("both")).get_current_head()
    assert head is not None
    return head


def history() -> list[dict[str, str | None]]:
    """Every migration of this version, oldest first: revision, what it came after, its first doc line."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config("both"))
    steps: list[dict[str, str | None]] = []
    for rev in reversed(list(script.walk_revisions())):
        down = rev.down_revision
        after = ", ".join(down) if isinstance(down, (tuple, list)) else down
        doc = (rev.doc or "").strip()
        steps.append(
            {"revision": str(rev.revision), "after": after, "description": doc.splitlines()[0] if doc else ""}
        )
    return steps


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
            # A database can carry the head revision and still lack a table of its role: an earlier
            # upgrade ran with another role (ETL_WAREHOUSE_URL set, then not), or a table was dropped.
            # Revisions cannot see that; the tables can. Missing ones are made as `schema` declares them.
            missing = _missing(conn, role)
            for meta in (schema.metadata, schema.warehouse_metadata):
                meta.create_all(conn, tables=[t for t in meta.sorted_tables if t.name in missing])
        after = current_revision(eng, role) or ""
        if missing:
            after += f" (made missing table(s): {', '.join(sorted(missing))})"
        done.append((role, before, after))
    return done


def expected_tables(role: str) -> set[str]:
    """The tables a database of this role must hold."""
    main = {t.name for t in schema.metadata.sorted_tables}
    results = {t.name for t in schema.warehouse_metadata.sorted_tables}
    return main if role == "main" else results if role == "warehouse" else main | results


def _missing(conn: Connection, role: str) -> set[str]:
    return expected_tables(role) - set(inspect(conn).get_table_names())


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
        where = eng.url.render_as_string(hide_password=True)
        what = "warehouse" if role == "warehouse" else "database"
        if current != head:
            state = "has no schema yet" if current is None else f"is at schema revision {current}"
            raise SchemaOutOfDate(
                f"the {what} {where} {state}; this version of etl needs {head}. Run: etl db upgrade"
            )
        with eng.connect() as conn:
            missing = _missing(conn, role)
        if missing:
            raise SchemaIncomplete(
                f"the {what} {where} is at revision {head} but lacks table(s) {', '.join(sorted(missing))} "
                "(an earlier upgrade ran with another ETL_WAREHOUSE_URL?); nothing is sent until it is "
                "complete. Run: etl db upgrade"
            )
