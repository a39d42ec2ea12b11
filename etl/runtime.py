"""What every job needs, built once at the entry point and passed down: config, engines, API, clock."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine

if TYPE_CHECKING:
    from etl.provider import Provider

from etl.api import Api
from etl.clock import utcnow
from etl.config import Config
from etl.life import Identity, Life
from etl.store.databases import Databases, installation

_gc_lock = threading.Lock()
_gc_pauses = 0  # jobs running inside `gc_paused` (the daemon may run a submit and a collect at once)
_gc_was_enabled = [True]


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is built or collected.

    A batch makes hundreds of thousands of short-lived dicts and strings, freed by reference counting;
    with the collector on, each few thousand allocations trigger a scan, and the older generations (the
    batch's expected rows, everything imported) are scanned again and again: 1.3 s of an 8.5 s
    `etl collect` of 100,000 results, 1 s of a 13 s `etl submit` (bench/RESULTS.md). The few cycles a
    batch makes are collected when the collector runs again after it.
    """
    global _gc_pauses
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled[0] = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled[0]:
                gc.enable()


def _never() -> bool:
    return False


@dataclass
class Runtime:
    """A thin holder of the parts (being retired: functions take the parts they use)."""

    config: Config
    db: Databases
    api: Api
    clock: Callable[[], datetime] = utcnow
    should_stop: Callable[[], bool] = _never
    me: Identity = field(default_factory=Identity)

    @property
    def engine(self) -> Engine:
        return self.db.main

    @property
    def warehouse(self) -> Engine:
        return self.db.warehouse

    @property
    def owner(self) -> str:
        return self.me.owner

    @property
    def life(self) -> Life:
        return self.me.life

    @property
    def provider(self) -> Provider:
        return self.api.provider

    @property
    def provider_ready(self) -> bool:
        return self.api.ready

    def warm_provider(self) -> None:
        self.api.warm()

    def installation(self) -> str:
        return installation(self.db, self.clock())

    @property
    def same_database(self) -> bool:
        return self.db.same

    def close(self) -> None:
        self.life.release()
        self.api.close()
        self.db.close()


def build(config: Config, *, clock: Callable[[], datetime] = utcnow) -> Runtime:
    return Runtime(config=config, db=Databases.open(config), api=Api.from_config(config), clock=clock)
