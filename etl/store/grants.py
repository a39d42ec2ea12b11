"""Least privilege on PostgreSQL: the producer, reader and daemon roles and exactly their rights (issue 24).

- producer: INSERT of the SQL contract's columns of `etl_queue` and nothing else (no SELECT, UPDATE or
  DELETE; the bookkeeping columns keep their defaults, and migration 0008 refuses a new row that is not
  queued whoever inserts it).
- reader: SELECT on every warehouse table and on the report tables (`READER_TABLES`).
- daemon: SELECT, INSERT and UPDATE on every table `etl.store.schema` declares for the database, DELETE only
  where the code deletes (`DAEMON_DELETES`), USAGE on the id sequences; not the owner, no CREATE, no
  TRUNCATE, no DDL. Advisory locks, LISTEN and NOTIFY need no grant.

Every role may read the schema version table(s) (`etl db check`, and `etl enqueue` checks the schema first).

The tables come from the schema module (`migrate.expected_tables`), so a table a later migration adds is
covered by running `etl db grants --apply` again after `etl db upgrade`; until then the daemon refuses to
start, naming the right it lacks (`missing`). Roles are made NOLOGIN if absent (log in as a member:
`CREATE ROLE app LOGIN IN ROLE etl_producer`); an existing role keeps its attributes and password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from etl.errors import ConfigError, MissingPrivilege
from etl.store import schema
from etl.store.dialect import capabilities
from etl.store.engine import GRANTS_HINT

PRODUCER_COLUMNS = ("doc_key", "body", "task", "metadata", "priority", "due_by", "mode")
READER_TABLES = frozenset({"etl_reports", "etl_events"})  # plus every warehouse table
# The tables the daemon deletes rows of: a released intent (submitter), a lease or the pause (store/state).
DAEMON_DELETES = frozenset({"etl_batches", "etl_state"})
KINDS = ("producer", "reader", "daemon")
ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class Roles:
    producer: str = "etl_producer"
    reader: str = "etl_reader"
    daemon: str = "etl_daemon"

    def __post_init__(self) -> None:
        bad = [f"--{k} {getattr(self, k)!r}" for k in KINDS if not ROLE_NAME.fullmatch(getattr(self, k))]
        if len({self.producer, self.reader, self.daemon}) < 3:
            bad.append("the three roles must have different names")
        if bad:
            raise ConfigError.one(
                f"bad role name(s): {'; '.join(bad)}; a role name is a letter or _ then letters, digits or _"
            )

    def of(self, kind: str) -> str:
        name: str = getattr(self, kind)
        return name


@dataclass(frozen=True)
class Right:
    """One privilege of one role on one table (or its columns) or sequence."""

    kind: str  # producer, reader or daemon
    privilege: str  # SELECT, INSERT, UPDATE, DELETE, USAGE
    relation: str
    columns: tuple[str, ...] = ()
    sequence: bool = False

    def __str__(self) -> str:
        cols = f" ({', '.join(self.columns)})" if self.columns else ""
        what = "SEQUENCE " if self.sequence else ""
        return f"{self.privilege}{cols} ON {what}{self.relation}"


def rights(db_role: str, sequences: dict[str, str]) -> list[Right]:
    """Every right of the three roles in a database of `db_role` (main, warehouse or both), derived from the
    schema module's tables. `sequences` maps a table to its id sequence (`id_sequences`)."""
    from etl.store.migrate import expected_tables

    tables = sorted(expected_tables(db_role))
    warehouse = {t.name for t in schema.warehouse_metadata.sorted_tables}
    out = [Right(k, "SELECT", v) for v in version_tables(db_role) for k in KINDS]
    if schema.queue.name in tables:
        out.append(Right("producer", "INSERT", schema.queue.name, PRODUCER_COLUMNS))
        if schema.queue.name in sequences:
            out.append(Right("producer", "USAGE", sequences[schema.queue.name], sequence=True))
    out += [Right("reader", "SELECT", t) for t in tables if t in warehouse or t in READER_TABLES]
    for t in tables:
        out += [Right("daemon", p, t) for p in ("SELECT", "INSERT", "UPDATE")]
        if t in DAEMON_DELETES:
            out.append(Right("daemon", "DELETE", t))
        if t in sequences:
            out.append(Right("daemon", "USAGE", sequences[t], sequence=True))
    return out


def version_tables(db_role: str) -> list[str]:
    return {
        "main": [schema.SCHEMA_VERSION_TABLE],
        "warehouse": [schema.WAREHOUSE_VERSION_TABLE],
        "both": [schema.SCHEMA_VERSION_TABLE],
    }[db_role]


def id_sequences(conn: Connection, db_role: str) -> dict[str, str]:
    """table -> the sequence its id column draws from (serial or identity), for the schema's tables."""
    from etl.store.migrate import expected_tables

    rows = conn.execute(
        text(
            "SELECT t.relname, s.relname FROM pg_class s "
            "JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass "
            "AND d.refclassid = 'pg_class'::regclass "
            "JOIN pg_class t ON t.oid = d.refobjid "
            "WHERE s.relkind = 'S' AND t.relnamespace = current_schema()::regnamespace "
            "AND t.relname = ANY(:tables)"
        ),
        {"tables": sorted(expected_tables(db_role))},
    ).all()
    return {str(t): str(s) for t, s in rows}


def _q(name: str) -> str:
    """A quoted identifier (role names are checked by `Roles`; a database's name may hold anything)."""
    return '"' + name.replace('"', '""') + '"'


def statements(conn: Connection, db_role: str, roles: Roles) -> list[str]:
    """The SQL that makes the three roles hold exactly their rights in this database."""
    database, where = conn.execute(text("SELECT current_database(), current_schema()")).one()
    out = []
    for kind in KINDS:
        name = roles.of(kind)
        out.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') "
            f"THEN CREATE ROLE {_q(name)} NOLOGIN; END IF; END $$"
        )
    sequences = id_sequences(conn, db_role)
    tables = sorted(set(version_tables(db_role)) | _existing(conn, db_role))
    names = ", ".join(_q(roles.of(k)) for k in KINDS)
    out.append(f"GRANT CONNECT ON DATABASE {_q(database)} TO {names}")
    out.append(f"GRANT USAGE ON SCHEMA {_q(where)} TO {names}")
    out.append(f"REVOKE ALL ON TABLE {', '.join(_q(t) for t in tables)} FROM {names}")
    if sequences:
        out.append(
            f"REVOKE ALL ON SEQUENCE {', '.join(_q(s) for s in sorted(sequences.values()))} FROM {names}"
        )
    grouped: dict[tuple[str, str, tuple[str, ...], bool], list[str]] = {}
    for r in rights(db_role, sequences):
        grouped.setdefault((r.kind, r.relation, r.columns, r.sequence), []).append(r.privilege)
    for (kind, relation, columns, sequence), privileges in grouped.items():
        cols = f" ({', '.join(_q(c) for c in columns)})" if columns else ""
        what = "SEQUENCE" if sequence else "TABLE"
        out.append(f"GRANT {', '.join(privileges)}{cols} ON {what} {_q(relation)} TO {_q(roles.of(kind))}")
    return out


def _existing(conn: Connection, db_role: str) -> set[str]:
    from sqlalchemy import inspect

    from etl.store.migrate import expected_tables

    return expected_tables(db_role) & set(inspect(conn).get_table_names())


def apply(conn: Connection, sql: list[str]) -> None:
    for statement in sql:
        conn.exec_driver_sql(statement)


def missing(conn: Connection, db_role: str, kind: str = "daemon") -> list[str]:
    """The rights of `kind` that the current user lacks here, as `INSERT ON etl_batches`; [] if none (an
    owner or superuser holds them all)."""
    sequences = id_sequences(conn, db_role)
    lacking = []
    params: dict[str, object]
    for r in rights(db_role, sequences):
        if r.kind != kind:
            continue
        if r.sequence:
            sql, params = (
                "SELECT has_sequence_privilege(:rel, :priv)",
                {"rel": r.relation, "priv": r.privilege},
            )
        elif r.columns:
            sql = "SELECT bool_and(has_column_privilege(:rel, c, :priv)) FROM unnest(CAST(:cols AS text[])) c"
            params = {"rel": r.relation, "priv": r.privilege, "cols": list(r.columns)}
        else:
            sql, params = "SELECT has_table_privilege(:rel, :priv)", {"rel": r.relation, "priv": r.privilege}
        if not conn.execute(text(sql), params).scalar():
            lacking.append(str(r))
    return lacking


def check(engine: Engine, warehouse: Engine, kind: str = "daemon") -> None:
    """Refuse to start, in one line, when the database user lacks a right of `kind` (PostgreSQL only: on
    SQLite the file's permissions decide, and the first write says so)."""
    from etl.store.migrate import roles

    for eng, db_role in roles(engine, warehouse):
        if not capabilities(eng).roles:
            continue
        with eng.connect() as conn:
            lacking = missing(conn, db_role, kind)
        if lacking:
            where = eng.url.render_as_string(hide_password=True)
            raise MissingPrivilege(
                f"the database user {eng.url.username or '(default)'!r} lacks {', '.join(lacking)} in {where}; "
                f"the {kind} needs them: {GRANTS_HINT}"
            )
