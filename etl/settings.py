"""The configuration the long-lived parts of the daemon read while they run (the live worker, the metrics
server, the job runner). Each `Config` is frozen; on SIGHUP the daemon swaps in the reloaded one as a
whole (one reference assignment, atomic), and a reader takes `current` once per run or page."""

from __future__ import annotations

from etl.config import Config


class Settings:
    def __init__(self, config: Config) -> None:
        self._config = config

    @property
    def current(self) -> Config:
        return self._config

    def swap(self, config: Config) -> None:
        """The daemon's reload: from now on `current` is `config`."""
        self._config = config
