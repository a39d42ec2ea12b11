"""`etl.errors.environmental`: the one place that tells the machine's failures from the data's, and
`clean`, which makes any outside text storable as a reason."""

from __future__ import annotations

import errno
import sqlite3

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.exc import OperationalError

from etl.errors import Environmental, clean, describe, environmental
from etl.store.warehouse import row_specific


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (sqlite3.OperationalError("database or disk is full"), "disk full"),
        (sqlite3.OperationalError("disk I/O error"), "disk I/O error"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only database"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (MemoryError(), "out of memory"),
        (psycopg.errors.DiskFull("could not extend file"), "disk full on the database server"),
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), "read-only database"),
        (
            OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full")),
            "disk full",
        ),
    ],
)
def test_the_machines_failures_are_named_with_what_to_do(exc: BaseException, words: str) -> None:
    found = environmental(exc, "the database sqlite:///x.db")
    assert isinstance(found, Environmental) and found.exit_code == 74
    text = str(found)
    assert text.startswith(words) and "nothing was lost" in text and "\n" not in text
    assert "cannot connect" not in text


@pytest.mark.parametrize(
    "exc",
    [
        sqlite3.OperationalError("no such table: etl_queue"),
        sqlite3.IntegrityError("UNIQUE constraint failed"),
        psycopg.errors.UniqueViolation("duplicate key"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        ValueError("bad"),
    ],
)
def test_everything_else_is_not_environmental(exc: BaseException) -> None:
    assert environmental(exc) is None


def test_a_full_disk_is_never_taken_for_a_bad_row() -> None:
    """The warehouse splits a chunk only for a row's fault: a full disk must stop the batch instead."""
    disk = OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    assert not row_specific(disk)
    assert row_specific(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert row_specific(OverflowError("Python int too large to convert to SQLite INTEGER"))


@given(st.text(st.characters(codec=None, exclude_categories=())), st.integers(1, 600))
def test_clean_makes_any_text_one_storable_line(text: str, limit: int) -> None:
    out = clean(text, limit)
    out.encode("utf-8")  # no lone surrogate left
    assert "\x00" not in out and "\n" not in out and len(out) <= limit


def test_describe_says_the_type_and_first_line() -> None:
    wrapped = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked\nmore"))
    assert describe(wrapped) == "OperationalError: database is locked"
