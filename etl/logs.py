"""structlog, configured once at the entry point: JSON lines off a terminal, colours on one."""

from __future__ import annotations

import logging
import re
import sys
import uuid
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_PATTERN = re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}")
_secrets: list[str] = []


def register_secret(value: str) -> None:
    """Any log line that would contain this value gets it masked instead."""
    if value and len(value) >= 4 and value not in _secrets:
        _secrets.append(value)


def _mask(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "********")
    return _SECRET_PATTERN.sub("sk-ant-********", text)


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if isinstance(value, str):
            event[key] = _mask(value)
        elif not isinstance(value, (int, float, bool, type(None))):
            masked = _mask(repr(value))
            if masked != repr(value):
                event[key] = masked
    return event


def configure(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str) if json else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)
    set_level(level)


def set_level(level: str) -> None:
    """Change the level (the daemon calls this on SIGHUP)."""
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
    # Third-party loggers go through the same pipeline but stay quiet unless asked.
    noisy = logging.DEBUG if level == "debug" else logging.WARNING
    for name in ("apscheduler", "sqlalchemy", "httpx2", "httpcore", "anthropic", "alembic"):
        logging.getLogger(name).setLevel(noisy)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@contextmanager
def run_context(job: str, run_id: str | None = None) -> Iterator[str]:
    """Every event logged inside (in this thread or context) carries `job` and `run_id`."""
    run_id = run_id or new_run_id()
    with structlog.contextvars.bound_contextvars(job=job, run_id=run_id):
        yield run_id
