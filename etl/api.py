"""The Message Batches API, as one object passed where it is used: the `Provider` (etl.provider), built on
first use or warmed on a thread beforehand. Nothing outside changes it: it only builds what it was given
the recipe for, once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from etl import memory

if TYPE_CHECKING:
    from etl.config import Config
    from etl.provider import Provider


class Api:
    def __init__(self, factory: Callable[[], Provider]) -> None:
        self._factory = factory
        self._provider: Provider | None = None
        self._warming: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config) -> Api:
        def factory() -> Provider:
            from etl.provider import Provider

            memory.freeze_imports()  # the SDK's modules, now loaded, are never garbage
            return Provider(
                api_key=config.require_api_key(),
                base_url=config.base_url,
                timeout=config.api_timeout_seconds,
                create_timeout=config.submit.create_timeout_seconds,
            )

        return cls(factory)

    @property
    def provider(self) -> Provider:
        with self._lock:
            if self._warming is not None:
                self._warming.join()
                self._warming = None
            if self._provider is None:  # not warmed, or warming failed: build here, raising what it raises
                self._provider = self._factory()
            return self._provider

    @property
    def ready(self) -> bool:
        """Built already: using `provider` now does not wait for the SDK to load."""
        return self._provider is not None and self._warming is None

    def warm(self) -> None:
        """Start building the provider on a thread, so the SDK's import (1-3 s of CPU: thousands of
        modules) runs while the caller waits for the database. `provider` waits for it. A failure is not
        kept: `provider` builds again and raises it where it always did."""
        with self._lock:
            if self._provider is not None or self._warming is not None:
                return

            def build() -> None:
                # e.g. no API key: `provider` builds again and raises it, with its message
                with suppress(Exception):
                    self._provider = self._factory()

            self._warming = threading.Thread(target=build, name="etl-provider-warm", daemon=True)
            self._warming.start()

    def close(self) -> None:
        if self._warming is not None:
            self._warming.join()
        if self._provider is not None:
            self._provider.close()
