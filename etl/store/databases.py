"""The databases a job works on: the main one (queue, batches, events) and the warehouse (results), which
is the same engine unless `separate_warehouse` is set. Built once at the entry point, never changed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from etl.config import Config
from etl.store.dialect import Capabilities, capabilities
from etl.store.engine import make_engine


@dataclass(frozen=True)
class Databases:
    main: Engine
    warehouse: Engine

    @classmethod
    def open(cls, config: Config) -> Databases:
        main = make_engine(config.database_url)
        warehouse = main if not config.separate_warehouse else make_engine(config.warehouse_url)
        return cls(main, warehouse)

    @classmethod
    def one(cls, engine: Engine) -> Databases:
        """The main database holding the results too."""
        return cls(engine, engine)

    @property
    def same(self) -> bool:
        """The warehouse is the main database: results commit in the same transaction as the queue."""
        return self.main is self.warehouse

    @property
    def capabilities(self) -> Capabilities:
        """What the main database can do (etl.store.dialect)."""
        return capabilities(self.main)

    def close(self) -> None:
        self.main.dispose()
        if not self.same:
            self.warehouse.dispose()


def installation(db: Databases, now: datetime) -> str:
    """This database's installation id (etl.store.state.installation_id)."""
    from etl.store import state

    with db.main.begin() as conn:
        return state.installation_id(conn, now)
