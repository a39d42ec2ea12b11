"""The warehouse table `etl_results`: idempotent bulk upserts, newest queue row wins.

Bulk paths, measured in bench/ (RESULTS.md): on PostgreSQL the chunk is COPYed into a session temp
table and merged with one `INSERT ... SELECT ... ON CONFLICT`; on SQLite multi-row upserts of a
statement compiled once. Values are converted by an `Encoder` for the dialect first (on SQLite the
columns' own bind processors, so the stored values are exactly what SQLAlchemy would have written);
the collector encodes on its reader thread, and its writer thread only sends.
"""

from __future__ import annotations

import json
import operator
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, column, func, select, table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from etl.clock import isoformat
from etl.errors import clean, describe, environmental
from etl.store.dialect import Capabilities, capabilities, insert_for
from etl.store.schema import Money, MoneyUnits, UtcDateTime, money_text, results

COLUMNS = [c.name for c in results.columns]
UPDATABLE = [c.name for c in results.columns if c.name not in ("doc_key", "task")]
TIMESTAMPS = {c.name for c in results.columns if isinstance(c.type, UtcDateTime)}
MONEY = {c.name for c in results.columns if isinstance(c.type, Money)}
LOAD_TABLE = "etl_results_load"
SQLITE_ROWS_PER_STATEMENT = 500


@dataclass
class Encoded:
    """Result rows as one dialect's bulk path writes them: values in `COLUMNS` order."""

    dialect: str
    rows: list[list[Any]] = field(default_factory=list)
    unique_keys: bool = False  # no two rows share a (doc_key, task): the merge has nothing to choose between


class Encoder:
    """Converts result rows for one dialect, remembering repeated timestamps."""

    def __init__(self, dialect: Dialect) -> None:
        self.caps = capabilities(dialect)
        self.dialect = self.caps.name  # what `Encoded` carries, checked against the connection by `write`
        self._values = operator.itemgetter(*COLUMNS)
        steps: list[Callable[[Any], Any] | None]
        if self.caps.bulk_copy:  # COPY text format: None is NULL, datetimes, JSON and money as text
            steps = [
                _memo(isoformat)  # text, not datetimes: psycopg formats a datetime anew for every row
                if name in TIMESTAMPS
                else json.dumps
                if name == "output_json"
                else money_text
                if name in MONEY
                else None
                for name in COLUMNS
            ]
            self._steps = [(i, step, False) for i, step in enumerate(steps) if step is not None]
        else:  # the columns' own bind processors, None included where they make something of it
            _, processors = _sqlite_statement(dialect)
            steps = [
                _memo(proc)
                if proc is not None and name in TIMESTAMPS
                else _units_first(proc)
                if proc is not None and name in MONEY
                else proc
                for name, proc in processors
            ]
            self._steps = [
                (i, step, step(None) is not None) for i, step in enumerate(steps) if step is not None
            ]

    def encode(self, row: dict[str, Any]) -> list[Any]:
        """A row given as a dict keyed by column name; without `mode` it came from the batch."""
        if "mode" not in row:
            row = {**row, "mode": "batch"}
        return self.encode_values(list(self._values(row)))

    def encode_values(self, values: list[Any]) -> list[Any]:
        """A row given as its values in `COLUMNS` order (converted in place)."""
        for i, step, convert_none in self._steps:
            value = values[i]
            if value is not None or convert_none:
                values[i] = step(value)
        return values


def upsert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert or replace results keyed by (doc_key, task).

    A row only replaces one from an older or the same queue row (`queue_id`), so re-collecting a batch
    changes nothing, and a late result for an old version of a document never overwrites the new one.
    """
    encoder = Encoder(conn.dialect)
    write(conn, Encoded(encoder.dialect, [encoder.encode(row) for row in rows]))


def upsert_few(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """`upsert` for a handful of rows (the live path: one result per call): one plain
    `INSERT ... ON CONFLICT` under the same `queue_id` guard, without the bulk path's temp table and COPY."""
    if rows:
        conn.execute(_few_statement(capabilities(conn)), [{"mode": "batch", **row} for row in rows])


@cache
def _few_statement(caps: Capabilities) -> Any:
    ins = insert_for(caps, results)
    return ins.on_conflict_do_update(
        index_elements=[results.c.doc_key, results.c.task],
        set_={name: ins.excluded[name] for name in UPDATABLE},
        where=results.c.queue_id <= ins.excluded.queue_id,
    )


def write(conn: Connection, encoded: Encoded) -> None:
    """`upsert` of rows already encoded for this connection's dialect."""
    caps = capabilities(conn)
    if encoded.dialect != caps.name:
        raise ValueError(f"rows encoded for {encoded.dialect} cannot be written to {caps.name}")
    if not encoded.rows:
        return
    if caps.bulk_copy:
        _upsert_postgresql(conn, encoded.rows, encoded.unique_keys)
    else:
        _upsert_sqlite(conn, encoded.rows)


QUEUE_ID = COLUMNS.index("queue_id")


def write_isolating(conn: Connection, encoded: Encoded) -> list[tuple[int, str]]:
    """`write`, inside the transaction open on `conn`, keeping out the rows the database refuses.

    The chunk is written under a savepoint; if the database refuses it, the chunk is split in halves, each
    under its own savepoint, down to single rows, so the rows it accepts are all written and each refused
    row is named: returned as (queue_id, the database's reason). On the happy path this costs one
    savepoint per chunk; a chunk with one bad row costs about 2 log2(rows) more writes.
    """
    refused: list[tuple[int, str]] = []

    def attempt(rows: list[list[Any]]) -> None:
        try:
            with conn.begin_nested():
                write(conn, Encoded(encoded.dialect, rows, encoded.unique_keys))
        except Exception as exc:  # split to find the row; re-raised when the database itself is at fault
            if not row_specific(exc):
                raise  # the database, not a row, is at fault: the batch is retried on the next collect
            if len(rows) == 1:
                refused.append((int(rows[0][QUEUE_ID]), _reason(exc)))
                return
            half = len(rows) // 2
            attempt(rows[:half])
            attempt(rows[half:])

    if encoded.rows:
        attempt(encoded.rows)
    return refused


# PostgreSQL error classes a single row's values can cause: data exceptions (22), integrity (23), program
# limits such as "index row size exceeds btree maximum" (54), and an exception raised by a trigger.
ROW_SQLSTATE_CLASSES = ("22", "23", "54")


def row_specific(exc: BaseException) -> bool:
    """Whether this failure can be caused by the values of a row, rather than by the database itself (a
    missing table, a lost connection, a full disk): only then is the chunk split to find the row.

    Besides the database's own refusals, a value the driver cannot send (pysqlite's encode error for a lone
    surrogate, an integer wider than SQLite's, psycopg's refusal of a NUL in COPY) is a row's doing. The
    machine's failures (`etl.errors.environmental`) never are."""
    if environmental(exc) is not None:
        return False
    if isinstance(exc, DBAPIError):
        if isinstance(exc, (IntegrityError, DataError)):
            return True
        exc = exc.orig if exc.orig is not None else exc
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in ROW_SQLSTATE_CLASSES or sqlstate == "P0001"
    if isinstance(exc, (UnicodeError, OverflowError, ValueError, TypeError)):
        return True
    return type(exc).__name__ in ("DataError", "IntegrityError")


def _reason(exc: BaseException) -> str:
    """The database's (or driver's) own message, first line, without SQLAlchemy's statement dump."""
    if isinstance(exc, DBAPIError):
        text = str(exc.orig) if exc.orig is not None else str(exc)
        return clean(text.strip().splitlines()[0]) if text.strip() else type(exc).__name__
    return describe(exc)


@cache
def _merge_statement(unique_keys: bool) -> Any:
    """INSERT ... SELECT from the load table, newest queue row per key, ON CONFLICT the same guard.

    With `unique_keys` (a batch rarely sends two versions of one document) the load table is read as it
    is: the DISTINCT ON sort was a third of the merge (0.17-0.28 s against 0.12-0.16 s per 20,000 rows).
    """
    load = table(LOAD_TABLE, *(column(name) for name in COLUMNS))
    rows = select(*(load.c[name] for name in COLUMNS))
    if not unique_keys:
        rows = rows.ext(postgresql.distinct_on(load.c.doc_key, load.c.task)).order_by(
            load.c.doc_key, load.c.task, load.c.queue_id.desc()
        )
    ins = postgresql.insert(results).from_select(COLUMNS, rows)
    return ins.on_conflict_do_update(
        index_elements=[results.c.doc_key, results.c.task],
        set_={name: ins.excluded[name] for name in UPDATABLE},
        where=results.c.queue_id <= ins.excluded.queue_id,
    )


def _upsert_postgresql(conn: Connection, rows: list[list[Any]], unique_keys: bool = False) -> None:
    """COPY the chunk into a temp table, then merge it in one statement.

    The temp table lives as long as the session; it is emptied after the merge, at every commit and by
    a rollback, so a call only ever merges its own rows. Within a chunk, `DISTINCT ON ... ORDER BY queue_id DESC` keeps
    the newest queue row of a (doc_key, task): the same end state as applying the rows one by one under
    the `queue_id <=` guard, and one statement never touches a key twice.
    """
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {LOAD_TABLE} (LIKE {results.name}) ON COMMIT DELETE ROWS"
    )
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cur, cur.copy(f"COPY {LOAD_TABLE} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    conn.execute(_merge_statement(unique_keys))
    conn.exec_driver_sql(f"DELETE FROM {LOAD_TABLE}")


@cache
def _sqlite_statement(dialect: Dialect) -> tuple[str, list[tuple[str, Callable[[Any], Any] | None]]]:
    """The upsert's SQL and, in parameter order, each column's bind processor for `dialect`."""
    ins = sqlite.insert(results)
    stmt = ins.on_conflict_do_update(
        index_elements=[results.c.doc_key, results.c.task],
        set_={name: ins.excluded[name] for name in UPDATABLE},
        where=results.c.queue_id <= ins.excluded.queue_id,
    )
    compiled = stmt.compile(dialect=dialect, column_keys=COLUMNS)
    order = list(compiled.positiontup or ())
    assert order == COLUMNS, order  # the Encoder writes values in COLUMNS order
    processors: list[tuple[str, Callable[[Any], Any] | None]] = [
        (name, results.c[name].type.dialect_impl(dialect).bind_processor(dialect)) for name in order
    ]
    return compiled.string, processors


def _units_first(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SQLite keeps money as an integer count of MONEY_UNIT: a `MoneyUnits` is that count already (the
    collector's prices); anything else goes through the column's own processor."""

    def convert(value: Any) -> Any:
        return int(value) if type(value) is MoneyUnits else process(value)

    return convert


def _memo(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Timestamps repeat across a chunk (collected_at, batch_ended_at, a bulk load's enqueued_at)."""
    seen: dict[Any, Any] = {}

    def convert(value: Any) -> Any:
        try:
            return seen[value]
        except KeyError:
            seen[value] = out = process(value)
            return out

    return convert


@cache
def _multi_row(sql: str, rows: int) -> str:
    """The one-row upsert with `rows` groups of placeholders after VALUES."""
    head, _, rest = sql.partition(" VALUES ")
    group, _, tail = rest.partition(") ")
    return f"{head} VALUES {', '.join([group + ')'] * rows)} {tail}"


def _upsert_sqlite(conn: Connection, rows: list[list[Any]]) -> None:
    """Multi-row statements of up to `SQLITE_ROWS_PER_STATEMENT` rows.

    Not executemany: that steps the statement once per row, and pysqlite takes the GIL back after
    each step; with the collector's reader thread busy parsing, each row then waited for the GIL (the
    write of a 10,000-result chunk took twice as long as on its own, bench/RESULTS.md). Rows with the
    same key in one statement are applied in order, as executemany would.
    """
    sql, processors = _sqlite_statement(conn.dialect)
    width = len(processors)
    params = [value for row in rows for value in row]
    per = max(1, min(SQLITE_ROWS_PER_STATEMENT, _variable_limit(conn) // width))
    for start in range(0, len(rows), per):
        count = min(per, len(rows) - start)
        conn.exec_driver_sql(_multi_row(sql, count), tuple(params[start * width : (start + count) * width]))


def _variable_limit(conn: Connection) -> int:
    """How many `?` one statement may hold (999 before SQLite 3.32, 32766 after, or as compiled)."""
    driver: Any = conn.connection.driver_connection
    return int(driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(results)).scalar_one())
