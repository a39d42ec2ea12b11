"""Least privilege (issue 24) on a real PostgreSQL with real roles, each logged in as itself."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

import etl
from etl.store import grants, schema
from etl.store.engine import make_engine
from etl.store.schema import DocStatus
from tests.pg_roles import Granted, cli, granted

# Every column of the queue that is not in the SQL contract: the bookkeeping the daemon alone writes.
BOOKKEEPING = [c.name for c in schema.queue.columns if c.name not in grants.PRODUCER_COLUMNS]


@pytest.fixture
def roles(make_pg_database: Callable[[], str]) -> Iterator[Granted]:
    with granted(make_pg_database()) as g:
        yield g


@pytest.fixture
def login(roles: Granted) -> Iterator[Callable[[str], Engine]]:
    engines: list[Engine] = []

    def connect(kind: str) -> Engine:
        engine = make_engine(roles.owner_url if kind == "owner" else roles.url(kind))
        engines.append(engine)
        return engine

    yield connect
    for e in engines:
        e.dispose()


def run(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.begin() as conn:
        result = conn.execute(text(sql), params)
        return list(result.all()) if result.returns_rows else []


def refused(engine: Engine, sql: str, **params: Any) -> str:
    with pytest.raises(ProgrammingError) as info:
        run(engine, sql, **params)
    assert getattr(info.value.orig, "sqlstate", None) == "42501", info.value
    return str(info.value.orig)


def test_the_producer_enqueues_every_contract_column_and_nothing_more(login: Callable[[str], Engine]) -> None:
    producer = login("producer")
    run(
        producer,
        "INSERT INTO etl_queue (doc_key, body, task, metadata, priority, due_by, mode) "
        "VALUES ('k', 'b', 'default', '{\"a\": 1}', 3, '2026-12-05T09:00:00Z', 'batch')",
    )
    run(producer, "INSERT INTO etl_queue (doc_key, body) VALUES ('k2', 'b')")
    assert run(login("owner"), "SELECT doc_key, status, attempts FROM etl_queue ORDER BY id") == [
        ("k", "queued", 0),
        ("k2", "queued", 0),
    ]
    for sql in (
        "SELECT * FROM etl_queue",
        "SELECT doc_key FROM etl_queue",
        "SELECT * FROM etl_results",
        "SELECT * FROM etl_reports",
        "SELECT * FROM etl_batches",
        "UPDATE etl_queue SET priority = 9",
        "UPDATE etl_queue SET status = 'dead'",
        "DELETE FROM etl_queue",
        "DELETE FROM etl_batches",
        "UPDATE etl_state SET value = '0'",
        "INSERT INTO etl_results (doc_key, task, queue_id, custom_id, batch_id, collected_at) "
        "VALUES ('k', 'default', 1, 'q1', 'b', now())",
        "TRUNCATE etl_queue",
    ):
        assert "permission denied" in refused(producer, sql), sql


@pytest.mark.parametrize("column", BOOKKEEPING)
def test_the_producer_cannot_set_a_bookkeeping_column(login: Callable[[str], Engine], column: str) -> None:
    value = {"status": "'queued'", "batch_ref": "NULL", "call_started_at": "NULL"}.get(column, "DEFAULT")
    refused(login("producer"), f"INSERT INTO etl_queue (doc_key, body, {column}) VALUES ('k', 'b', {value})")


@pytest.mark.parametrize("status", [s.value for s in DocStatus if s is not DocStatus.QUEUED])
def test_not_even_the_owner_can_insert_a_row_that_is_not_queued(
    login: Callable[[str], Engine], status: str
) -> None:
    owner = login("owner")
    for values in (
        f"(doc_key, body, status) VALUES ('k', 'b', '{status}')",
        "(doc_key, body, call_started_at) VALUES ('k', 'b', now())",
    ):
        with pytest.raises(DBAPIError, match=r"etl_queue: a new row must be queued") as info:
            run(owner, f"INSERT INTO etl_queue {values}")
        assert getattr(info.value.orig, "sqlstate", None) == "23514"  # check_violation
    run(owner, "INSERT INTO etl_queue (doc_key, body, status) VALUES ('k', 'b', 'queued')")


def test_the_reader_reads_results_and_reports_and_nothing_else(login: Callable[[str], Engine]) -> None:
    reader = login("reader")
    for table in ("etl_results", "etl_reports", "etl_events"):
        assert run(reader, f"SELECT count(*) FROM {table}") == [(0,)]
    for sql in (
        "SELECT * FROM etl_queue",
        "SELECT * FROM etl_batches",
        "SELECT * FROM etl_state",
        "INSERT INTO etl_queue (doc_key, body) VALUES ('k', 'b')",
        "UPDATE etl_results SET output_text = 'x'",
        "DELETE FROM etl_results",
        "INSERT INTO etl_reports (created_at, body) VALUES (now(), '{}')",
    ):
        assert "permission denied" in refused(reader, sql), sql


def test_the_daemon_has_every_right_it_needs_and_no_ddl(login: Callable[[str], Engine]) -> None:
    daemon = login("daemon")
    with daemon.connect() as conn:
        assert grants.missing(conn, "both") == []
    for sql in (
        "CREATE TABLE etl_mine (x int)",
        "TRUNCATE etl_queue",
        "DELETE FROM etl_queue",
        "DELETE FROM etl_results",
        "ALTER TABLE etl_queue ADD COLUMN x int",
        "DROP TABLE etl_state",
        "DELETE FROM etl_alembic_version",
    ):
        assert refused(daemon, sql)


def test_a_separate_warehouse_gets_the_reader_and_daemon_rights_of_its_tables(
    make_pg_database: Callable[[], str],
) -> None:
    main, wh = make_pg_database(), make_pg_database()
    with granted(main, wh) as g:
        as_wh = Granted(wh, g.roles)
        engines = {k: make_engine(g.url(k)) for k in ("producer", "reader", "daemon")}
        engines |= {f"wh_{k}": make_engine(as_wh.url(k)) for k in ("producer", "reader", "daemon")}
        try:
            run(engines["producer"], "INSERT INTO etl_queue (doc_key, body) VALUES ('k', 'b')")
            with engines["daemon"].connect() as conn:
                assert grants.missing(conn, "main") == []
            with engines["wh_daemon"].connect() as conn:
                assert grants.missing(conn, "warehouse") == []
            assert run(engines["wh_reader"], "SELECT count(*) FROM etl_results") == [(0,)]
            assert run(engines["reader"], "SELECT count(*) FROM etl_reports") == [(0,)]
            refused(engines["wh_producer"], "SELECT * FROM etl_results")
            refused(engines["reader"], "SELECT * FROM etl_queue")
        finally:
            for e in engines.values():
                e.dispose()


def test_the_producer_can_use_etl_enqueue(roles: Granted, tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text('{"doc_key": "only", "body": "one line"}\n', encoding="utf-8")
    assert cli(roles.url("producer"), "enqueue", str(file)) == 0
    assert run(make_engine(roles.owner_url), "SELECT doc_key, status FROM etl_queue") == [("only", "queued")]


def test_an_upgrade_by_the_owner_keeps_the_grants(roles: Granted, login: Callable[[str], Engine]) -> None:
    from alembic import command

    from etl.store import migrate

    owner = login("owner")
    cfg = migrate._alembic_config("both")
    with owner.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    assert cli(roles.owner_url, "db", "upgrade") == 0
    with login("daemon").connect() as conn:
        assert grants.missing(conn, "both") == []
    run(login("producer"), "INSERT INTO etl_queue (doc_key, body) VALUES ('after', 'upgrade')")
    refused(login("producer"), "SELECT * FROM etl_queue")


def test_a_missing_right_is_one_line_naming_it(
    roles: Granted, login: Callable[[str], Engine], capsys: pytest.CaptureFixture[str]
) -> None:
    run(login("owner"), f'REVOKE DELETE ON etl_state FROM "{roles.roles.daemon}"')
    assert cli(roles.url("daemon"), "run") == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"the database user '{roles.roles.daemon}' lacks DELETE ON etl_state" in err
    assert "etl db grants --apply" in err
    # A command the role has no business running: the database's refusal, in one line too.
    assert cli(roles.url("reader"), "submit") == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "permission denied for table etl_" in err, err


def test_grants_prints_the_sql_and_applies_nothing_without_apply(
    roles: Granted, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(roles.owner_url, "db", "grants", "--producer", "etl_p_never_made") == 0
    out = capsys.readouterr().out
    assert (
        'GRANT INSERT ("doc_key", "body", "task", "metadata", "priority", "due_by", "mode") ON TABLE "etl_queue"'
        in out
    )
    assert run(
        make_engine(roles.owner_url), "SELECT count(*) FROM pg_roles WHERE rolname = 'etl_p_never_made'"
    ) == [(0,)]


@pytest.mark.parametrize("name", ["bad-name", "x; DROP TABLE etl_queue", "1abc", ""])
def test_a_bad_role_name_is_refused_in_one_line(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert cli(url, "db", "upgrade") == 0
    capsys.readouterr()
    assert cli(url, "db", "grants", f"--daemon={name}") == 78
    assert "bad role name" in capsys.readouterr().err


def test_grants_on_sqlite_says_the_file_permissions_are_the_rights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert cli(url, "db", "grants") == 78, "only etl db upgrade makes a missing SQLite file"
    assert not (tmp_path / "x.db").exists()
    assert cli(url, "db", "upgrade") == 0
    capsys.readouterr()
    assert cli(url, "db", "grants") == 0
    captured = capsys.readouterr()
    assert "0600" in captured.out and "0600" in captured.err
    assert cli(url, "db", "grants", "--apply") == 1


def test_a_new_sqlite_database_is_the_service_users_alone_whatever_the_umask(tmp_path: Path) -> None:
    """SQLite has no roles: whoever reads the file reads every document, so it is made 0600 (its folder
    0700), and its -wal and -shm files take that mode."""
    from etl.store import migrate

    old = os.umask(0o022)
    try:
        path = tmp_path / "state" / "etl.db"
        engine = make_engine(f"sqlite:///{path}")
        migrate.upgrade(engine, engine)
        run(engine, "INSERT INTO etl_queue (doc_key, body) VALUES ('k', 'b')")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
        engine.dispose()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert modes["etl.db"] == 0o600 and set(modes.values()) == {0o600}, modes


def test_the_daemon_may_delete_exactly_where_the_code_deletes() -> None:
    """DAEMON_DELETES is kept by hand: every `delete(table)` in the package must be in it (or the daemon
    role fails there), and nothing else (least privilege). A new table's deletes are caught here."""
    import ast

    from sqlalchemy import Table

    deleted = set()
    for path in Path(etl.__file__).parent.rglob("*.py"):
        if "emulator" in path.parts or "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "delete" and node.args:
                arg = node.args[0]
                name = arg.id if isinstance(arg, ast.Name) else getattr(arg, "attr", "")
                table = getattr(schema, name, None)
                assert isinstance(table, Table), (
                    f"{path}: delete({name}) of a table etl.store.schema does not declare"
                )
                deleted.add(table.name)
    assert deleted == set(grants.DAEMON_DELETES)


def test_a_daemon_loop_logs_a_refused_right_in_one_line_without_a_traceback(
    roles: Granted, login: Callable[[str], Engine]
) -> None:
    from structlog.testing import capture_logs

    from etl.jobs import log_failure

    reader = login("reader")
    with pytest.raises(ProgrammingError) as info:
        run(reader, "UPDATE etl_queue SET priority = 1")
    with capture_logs() as logs:
        detail = log_failure("job_failed", info.value, reader.url.username)
    assert logs == [{"event": "job_failed", "error": detail, "log_level": "error"}]  # no exc_info
    assert detail.startswith(
        f"the database user '{roles.roles.reader}' lacks a right this needs (permission denied"
    )
    assert "\n" not in detail and "etl db grants --apply" in detail
