"""A test's handle on the parts etl's entry points build (etl.parts): each test passes the parts a function
takes, as the CLI and the daemon do. Test-only: it may be changed in place (a test swaps its clock or its
identity); nothing in etl/ takes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine

from etl.api import Api
from etl.clock import never, utcnow
from etl.config import Config
from etl.life import Identity, Life
from etl.provider import Provider
from etl.store.databases import Databases, installation


@dataclass
class Harness:
    config: Config
    db: Databases
    api: Api
    clock: Callable[[], datetime] = utcnow
    should_stop: Callable[[], bool] = never
    me: Identity = field(default_factory=Identity)

    @property
    def engine(self) -> Engine:
        return self.db.main

    @property
    def warehouse(self) -> Engine:
        return self.db.warehouse

    @property
    def same_database(self) -> bool:
        return self.db.same

    @property
    def owner(self) -> str:
        return self.me.owner

    @property
    def life(self) -> Life:
        return self.me.life

    @property
    def provider(self) -> Provider:
        return self.api.provider

    def warm_provider(self) -> None:
        self.api.warm()

    def installation(self) -> str:
        return installation(self.db, self.clock())

    def close(self) -> None:
        self.me.life.release()
        self.api.close()
        self.db.close()


def build(config: Config, *, clock: Callable[[], datetime] = utcnow) -> Harness:
    return Harness(config, Databases.open(config), Api.from_config(config), clock)
