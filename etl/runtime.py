"""What every job needs, built once at the entry point and passed down: config, engines, API, clock."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine

if TYPE_CHECKING:
    from etl.provider import Provider

from etl import life, liveness
from etl.clock import utcnow
from etl.config import Config
from etl.store.engine import make_engine

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
    config: Config
    engine: Engine
    warehouse: Engine
    provider_factory: Callable[[], Provider]
    clock: Callable[[], datetime] = utcnow
    should_stop: Callable[[], bool] = _never
    owner: str = field(default_factory=liveness.new_owner)  # etl.liveness: who we are
    life: life.Life = field(default_factory=life.Life)  # etl.life: the lock that proves we are alive
    _provider: Provider | None = None
    _installation: str | None = None
    _warming: threading.Thread | None = None
    _provider_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def provider(self) -> Provider:
        with self._provider_lock:
            if self._warming is not None:
                self._warming.join()
                self._warming = None
            if self._provider is None:  # not warmed, or warming failed: build here, raising what it raises
                self._provider = self.provider_factory()
            return self._provider

    @property
    def provider_ready(self) -> bool:
        """Built already: using `provider` now does not wait for the SDK to load."""
        return self._provider is not None and self._warming is None

    def warm_provider(self) -> None:
        """Start building the provider on a thread, so the SDK's import (1-3 s of CPU: thousands of
        modules) runs while the caller waits for the database. `provider` waits for it. A failure is not
        kept: `provider` builds again and raises it where it always did."""
        with self._provider_lock:
            if self._provider is not None or self._warming is not None:
                return

            def build() -> None:
                # e.g. no API key: `provider` builds again and raises it, with its message
                with suppress(Exception):
                    self._provider = self.provider_factory()

            self._warming = threading.Thread(target=build, name="etl-provider-warm", daemon=True)
            self._warming.start()

    def installation(self) -> str:
        """This database's installation id (etl.store.state.installation_id), read once."""
        if self._installation is None:
            from etl.store import state

            with self.engine.begin() as conn:
                self._installation = state.installation_id(conn, self.clock())
        return self._installation

    @property
    def same_database(self) -> bool:
        return self.engine is self.warehouse

    def close(self) -> None:
        self.life.release()
        if self._warming is not None:
            self._warming.join()
        if self._provider is not None:
            self._provider.close()
        self.engine.dispose()
        if not self.same_database:
            self.warehouse.dispose()


def build(config: Config, *, clock: Callable[[], datetime] = utcnow) -> Runtime:
    engine = make_engine(config.database_url)
    warehouse = engine if not config.separate_warehouse else make_engine(config.warehouse_url)

    def factory() -> Provider:
        from etl.provider import Provider

        return Provider(
            api_key=config.require_api_key(),
            base_url=config.base_url,
            timeout=config.api_timeout_seconds,
            create_timeout=config.submit.create_timeout_seconds,
        )

    return Runtime(config=config, engine=engine, warehouse=warehouse, provider_factory=factory, clock=clock)
