"""What an entry point (a CLI command, the demo) builds once from the configuration and hands out piece
by piece: the functions it calls take only the parts they use, never this whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from etl.api import Api
from etl.clock import utcnow
from etl.config import Config
from etl.life import Identity
from etl.store.databases import Databases


@dataclass(frozen=True)
class Parts:
    config: Config
    db: Databases
    api: Api
    clock: Callable[[], datetime] = utcnow
    me: Identity = field(default_factory=Identity)

    @classmethod
    def open(cls, config: Config, *, clock: Callable[[], datetime] = utcnow) -> Parts:
        return cls(config, Databases.open(config), Api.from_config(config), clock)

    def close(self) -> None:
        self.me.life.release()
        self.api.close()
        self.db.close()
