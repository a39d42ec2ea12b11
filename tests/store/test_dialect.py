"""Dialect differences are answered in one place: `etl.store.dialect`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

import etl
from etl.store.dialect import POSTGRESQL, SQLITE, capabilities, database_file
from etl.store.engine import make_engine

PACKAGE = Path(etl.__file__).parent
# Files still testing a dialect's name while other branches rewrite them; empty once they are merged.
PENDING: set[str] = set()
NAME_TEST = re.compile(r"""dialect(\.name)?\s*[!=]=|[!=]=\s*["'](sqlite|postgresql)["']""")


def test_no_module_outside_store_tests_which_database_it_is() -> None:
    found = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "store" not in path.relative_to(PACKAGE).parts
        and NAME_TEST.search(path.read_text(encoding="utf-8"))
    }
    assert found <= PENDING, sorted(found - PENDING)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def test_each_database_is_one_capabilities_object(engine: Engine, db_url: str) -> None:
    caps = capabilities(engine)
    assert caps is (SQLITE if db_url.startswith("sqlite") else POSTGRESQL)
    with engine.connect() as conn:
        assert capabilities(conn) is caps is capabilities(engine.dialect)
    assert caps.advisory_locks is caps.listen_notify is caps.roles is (not caps.nul_in_text) is caps.server


def test_only_a_sqlite_file_has_a_database_file(tmp_path: Path) -> None:
    file = make_engine(f"sqlite:///{tmp_path / 'etl.db'}")
    memory = make_engine("sqlite://")
    assert database_file(file) == tmp_path / "etl.db"
    assert database_file(memory) is None
    file.dispose()
    memory.dispose()
