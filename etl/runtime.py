"""What every job needs, built once at the entry point and passed down: config, engines, API, clock."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine

if TYPE_CHECKING:
    from etl.provider import Provider

from etl.clock import utcnow
from etl.config import Config
from etl.store.engine import make_engine


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
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    _provider: Provider | None = None

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = self.provider_factory()
        return self._provider

    @property
    def same_database(self) -> bool:
        return self.engine is self.warehouse

    def close(self) -> None:
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
