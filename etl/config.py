"""Configuration: `config/etl.toml` plus environment overrides, read once into a frozen object.

Every problem found is collected and raised together as one `ConfigError`, so a user fixes the file
once, not once per problem.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from etl.errors import ConfigError, MissingApiKey

_S = TypeVar("_S", "SubmitSettings", "CollectSettings", "ScheduleSettings", "LiveSettings", "MetricsSettings")

DEFAULT_CONFIG_PATHS = (Path("config/etl.toml"), Path("/etc/etl/etl.toml"))
CREDENTIAL_NAME = "anthropic_api_key"
DB_PASSWORD_CREDENTIAL = "database_password"  # the queue database's password (credentials, Docker secrets)
WH_PASSWORD_CREDENTIAL = "warehouse_password"  # the warehouse's, when it is another database
# (doc_key, task) is the warehouse's primary key: PostgreSQL refuses a btree entry over 2,704 bytes, so
# the two together are kept well under it (README "Limits of a document").
MAX_TASK_NAME_BYTES = 128
TEMPLATE_BUILTINS = frozenset({"body", "doc_key", "task"})
CRON_FIELD = re.compile(r"^[0-9*/,\-A-Za-z?]+$")


@dataclass(frozen=True)
class Secret:
    """A string that never shows itself in `repr`, `str` or a log line."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('********')" if self.value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True)
class Task:
    name: str = field(metadata={"derived": True})  # the table's name
    model: str
    template: str
    max_tokens: int
    system: str = ""
    output_schema: Mapping[str, Any] | None = None
    cache_system: bool = False
    template_fields: tuple[str, ...] = field(default=(), metadata={"derived": True})
    max_cost_usd_per_night: Decimal | None = None  # this task's own nightly cap (None: only the global one)
    live: bool = True  # may urgent rows of this task use the live Messages API (issue 15)?

    @cached_property  # read for every document a submit or an estimate builds
    def metadata_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.template_fields if f not in TEMPLATE_BUILTINS)


@dataclass(frozen=True)
class ModelPrice:
    """Standard (non-batch) prices in USD per million tokens, exact."""

    input: Decimal
    output: Decimal


@dataclass(frozen=True)
class Pricing:
    models: Mapping[str, ModelPrice]
    batch_discount: Decimal = Decimal("0.5")
    cache_write_5m: Decimal = Decimal("1.25")
    cache_write_1h: Decimal = Decimal("2")
    cache_read: Decimal = Decimal("0.1")

    def for_model(self, model: str) -> ModelPrice | None:
        """Longest configured prefix of `model` wins: `claude-haiku-4-5` prices `claude-haiku-4-5-20251001`."""
        best: tuple[int, ModelPrice] | None = None
        for name, price in self.models.items():
            if model.startswith(name) and (best is None or len(name) > best[0]):
                best = (len(name), price)
        return None if best is None else best[1]


@dataclass(frozen=True)
class SubmitSettings:
    max_requests_per_batch: int = 100_000
    max_batch_bytes: int = 200_000_000
    max_body_bytes: int = 1_000_000
    max_attempts: int = 3
    claim_lease_seconds: int = 600
    create_timeout_seconds: float = 300.0
    reconcile_grace_seconds: int = 1800
    max_batches_per_run: int = 1000
    # An unknown create whose process is known dead (etl.liveness) is released this long after the death
    # was first seen, instead of after reconcile_grace_seconds: nothing it sent can still be in flight.
    dead_owner_settle_seconds: int = 15
    # The nightly budget (0: none): batches are sent only while the upper bound of what was sent tonight
    # stays within it. A night runs from noon to noon in schedule.timezone.
    max_cost_usd_per_night: Decimal = Decimal(0)
    # `etl estimate --count-tokens`: how many documents are sent to count_tokens (a sample above that)
    count_tokens_sample: int = 200
    count_tokens_confidence: float = 0.95


@dataclass(frozen=True)
class CollectSettings:
    chunk_size: int = 20000
    stream_retries: int = 3
    stream_backoff_seconds: float = 2.0
    stream_timeout_seconds: float = 120.0
    late_after_days: float = 7.0
    warn_before_archive_days: float = 7.0


@dataclass(frozen=True)
class ScheduleSettings:
    timezone: str = "UTC"
    submit_cron: str = "0 0 * * *"
    collect_cron: str = "0 7 * * *"
    poll_minutes: float = 30.0
    poll_max_minutes: float = 240.0
    leader_lease_seconds: int = 120
    # A crashed, interrupted or partial submit is re-run with backoff (doubling from retry_backoff_seconds
    # up to retry_backoff_max_seconds) until its rows are sent or until this local time, then reported.
    retry_until: str = "06:00"
    retry_backoff_seconds: float = 5.0
    retry_backoff_max_seconds: float = 600.0

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class LiveSettings:
    """The live path (etl/live.py): urgent rows through the Messages API at the standard price."""

    enabled: bool = True  # run the live worker inside `etl run`
    batch_latency_hours: float = 24.0  # allowance for a batch to end (the API's bound); see etl/routing.py
    poll_seconds: float = 2.0  # SQLite: how often to look for urgent rows (PostgreSQL is woken by NOTIFY)
    concurrency: int = 4  # Messages calls in flight at once
    requests_per_minute: int = 50  # never more calls than this in any 60 s
    max_attempts: int = 3  # calls per document before it is `dead`
    backoff_seconds: float = 1.0  # first wait after a 429/529/5xx without retry-after; doubles
    max_backoff_seconds: float = 60.0
    claim_lease_seconds: float = 120.0  # a `calling` row not renewed this long belonged to a dead worker
    daily_spend_cap_usd: Decimal = Decimal(0)  # live spend per UTC day, calls in flight counted (0: none)
    slot_hold_minutes: float = (
        30.0  # after a submit slot fires, route as if its batch leaves now (routing.py)
    )


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus page `etl run` serves (etl/metrics.py); `etl metrics` prints it whatever this says."""

    listen: str = "127.0.0.1:9464"  # HOST:PORT ([::1]:9464 for IPv6); "off" serves nothing

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, None when off. Valid by construction (`load` checked it)."""
        return listen_address(self.listen)


METRICS_OFF = ("off", "")


def listen_address(text: str) -> tuple[str, int] | None:
    """`127.0.0.1:9464` → ('127.0.0.1', 9464); `[::1]:9464` → ('::1', 9464); `off` → None.
    ValueError, saying what is wrong, for anything else."""
    if text.strip().lower() in METRICS_OFF:
        return None
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464) or off")
    return host, int(port)


@dataclass(frozen=True)
class Config:
    """Where each field goes in a config file: `metadata={"toml": "section.key"}`, `"skip"` for what is
    not a setting; a field without it is the table of its own name (`etl config` prints them all)."""

    database_url: str = field(metadata={"toml": "database.url"})
    warehouse_url: str = field(metadata={"toml": "database.warehouse_url"})
    api_key: Secret = field(metadata={"toml": "skip"})
    api_key_sources: tuple[str, ...] = field(metadata={"toml": "skip"})
    base_url: str | None = field(metadata={"toml": "api.base_url"})
    api_timeout_seconds: float = field(metadata={"toml": "api.timeout_seconds"})
    tasks: Mapping[str, Task]
    pricing: Pricing
    submit: SubmitSettings
    collect: CollectSettings
    schedule: ScheduleSettings
    source: str = field(default="<defaults>", metadata={"toml": "skip"})
    live: LiveSettings = field(default_factory=LiveSettings)
    log_level: str = field(default="info", metadata={"toml": "logging.level"})
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    # What the file says that is accepted but ignored (IGNORED): `etl` logs each as a warning.
    warnings: tuple[str, ...] = field(default=(), metadata={"toml": "skip"})

    @property
    def separate_warehouse(self) -> bool:
        return self.warehouse_url != self.database_url

    def require_api_key(self) -> str:
        if not self.api_key:
            raise MissingApiKey(list(self.api_key_sources))
        return self.api_key.value


# Settings an older version read: a config that still sets one loads, with a warning that it is ignored.
IGNORED = {
    "submit.reconcile_window_seconds": "unused since a batch's owner is proved without a clock window",
}

SQL_SCHEMES = ("sqlite:", "postgresql://", "postgresql+psycopg://", "postgres://", "postgres+psycopg://")


def _url_password(url: str) -> tuple[str, str, str] | None:
    """(scheme, user, password) of a URL that carries a password, else None. The password runs to the
    last `@` (a password may hold `@`, `/` or `:`; the user name holds none of them)."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon or "/" in user:
        return None
    return scheme, user, password


def mask_url(url: str) -> str:
    """The whole URL with its password (if any) replaced by `***`, for messages and logs."""
    parts = _url_password(url)
    if parts is None:
        return url
    scheme, user, _password = parts
    rest = url.partition("://")[2]
    return f"{scheme}://{user}:***@{rest[rest.rfind('@') + 1 :]}"


def base_url_problem(url: str, source: str) -> str | None:
    """Why an API base URL cannot work, or None. Checked at start, before a row is claimed: without a
    scheme no request can leave, and a `/v1` path makes every call a 404 (the SDK adds `/v1` itself)."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return (
            f"{source} {url!r} is not an http:// or https:// URL with a host; "
            "write it whole, e.g. https://api.anthropic.com or http://127.0.0.1:8765"
        )
    if parsed.path.rstrip("/").endswith("/v1"):
        return (
            f"{source} {url!r} ends in /v1, which the API client adds itself (every call would be a 404); "
            f"drop it: {url.rstrip('/')[:-3]}"
        )
    return None


def url_passwords(cfg: Config) -> list[str]:
    """The database passwords inside the configured URLs (as written and decoded), for the log redactor."""
    from urllib.parse import unquote

    found: list[str] = []
    for url in {cfg.database_url, cfg.warehouse_url}:
        parts = _url_password(url)
        if parts and parts[2]:
            found.extend(sorted({parts[2], unquote(parts[2])}))
    return found


def searched_paths(env: Mapping[str, str]) -> list[str]:
    """Where a config file is looked for, in order, as a readable list."""
    first = f"$ETL_CONFIG ({env['ETL_CONFIG']})" if env.get("ETL_CONFIG") else "$ETL_CONFIG (not set)"
    return [first, *(str(p.absolute()) if not p.is_absolute() else str(p) for p in DEFAULT_CONFIG_PATHS)]


def find_config_path(env: Mapping[str, str]) -> Path | None:
    if env.get("ETL_CONFIG"):
        return Path(env["ETL_CONFIG"])
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.is_file():
            return candidate
    return None


def load(env: Mapping[str, str] | None = None, path: Path | None = None) -> Config:
    """Read the TOML file (if any) and the environment, validate, and return a frozen Config."""
    env = os.environ if env is None else env
    problems: list[str] = []
    given = "--config" if path is not None else "ETL_CONFIG" if env.get("ETL_CONFIG") else None
    path = path or find_config_path(env)
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is None:
        # Without a file there are no tasks, and "no [tasks] defined" would hide the real problem.
        raise ConfigError.one(
            f"no configuration file found; looked at: {', '.join(searched_paths(env))}. "
            "Copy config/etl.toml from the project, or pass --config FILE"
        )
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError.one(
            f"config file {path} (from {given or 'the default locations'}) does not exist"
        ) from None
    except IsADirectoryError:
        raise ConfigError.one(
            f"config file {path} (from {given or 'the default locations'}) is a directory"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path}: not valid TOML: {exc}")
    except OSError as exc:
        raise ConfigError.one(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    base_dir = path.parent.parent if path is not None and path.parent.name == "config" else Path.cwd()
    cfg = _build(raw, env, problems, source, base_dir)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def _section(raw: Mapping[str, Any], name: str, problems: list[str]) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        problems.append(f"[{name}] must be a table")
        return {}
    return value


def _typed(
    section: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    default: Any,
    where: str,
    problems: list[str],
) -> Any:
    if key not in section:
        return default
    value = section[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        problems.append(f"{where}.{key} must be {kinds[0].__name__}, got {value!r}")
        return default
    if not isinstance(value, kinds):
        problems.append(f"{where}.{key} must be {kinds[0].__name__}, got {value!r}")
        return default
    return value


def _positive(value: float, where: str, problems: list[str]) -> None:
    if value <= 0:
        problems.append(f"{where} must be positive, got {value!r}")


def _api_key(env: Mapping[str, str]) -> tuple[Secret, tuple[str, ...]]:
    sources = ["the environment variable ANTHROPIC_API_KEY"]
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    cred_hint = (
        f"the file {cred_dir}/{CREDENTIAL_NAME} (systemd LoadCredential=)"
        if cred_dir
        else f"the file $CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME} (systemd LoadCredential=; not set here)"
    )
    sources.append(cred_hint)
    key = env.get("ANTHROPIC_API_KEY", "").strip()
    if not key and cred_dir:
        try:
            key = (Path(cred_dir) / CREDENTIAL_NAME).read_text(encoding="utf-8").strip()
        except OSError:
            key = ""
    return Secret(key), tuple(sources)


def _with_password(url: str, env: Mapping[str, str], name: str, problems: list[str]) -> str:
    """A PostgreSQL URL without a password gets the one in `$CREDENTIALS_DIRECTORY/<name>` (systemd
    LoadCredential=; Docker secrets, with CREDENTIALS_DIRECTORY=/run/secrets as the image sets), so the
    password sits neither in the environment nor in a config file. A password in the URL wins."""
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not cred_dir or not url.startswith(("postgresql", "postgres")) or "://" not in url:
        return url
    path = Path(cred_dir) / name
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        return url
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(
            f"cannot read the database password in {path}: {getattr(exc, 'strerror', None) or exc}"
        )
        return url
    scheme, rest = url.split("://", 1)
    netloc, sep, tail = rest.partition("/")
    user, at, host = netloc.rpartition("@")
    if ":" in user:
        return url
    return f"{scheme}://{user}:{quote(password, safe='')}@{host}{sep}{tail}" if at else url


def _sqlite_url_relative_to(url: str, base_dir: Path) -> str:
    """`sqlite:///var/etl.db` in the shipped config means relative to the project, not the cwd."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        rel = url[len(prefix) :]
        if not rel.startswith("/"):
            return prefix + str((base_dir / rel).resolve())
    return url


KNOWN_SECTIONS = (
    "database",
    "api",
    "submit",
    "collect",
    "schedule",
    "pricing",
    "tasks",
    "logging",
    "live",
    "metrics",
)


def _build(
    raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str], source: str, base_dir: Path
) -> Config | None:
    for key in raw:
        if key not in KNOWN_SECTIONS:
            problems.append(f"unknown section [{key}] (known: {', '.join(sorted(KNOWN_SECTIONS))})")
    warnings: list[str] = []
    database_url, warehouse_url = _database_urls(_section(raw, "database", problems), env, base_dir, problems)
    base_url, api_timeout = _api(_section(raw, "api", problems), env, problems)
    api_key, key_sources = _api_key(env)
    submit = _submit(_ignoring(_section(raw, "submit", problems), "submit", warnings), problems)
    collect = _collect(_section(raw, "collect", problems), problems)
    schedule = _schedule(_section(raw, "schedule", problems), env, problems)
    live = _live(_section(raw, "live", problems), problems)
    metrics = _metrics(_section(raw, "metrics", problems), env, problems)
    pricing = _pricing(_section(raw, "pricing", problems), problems)
    tasks = _tasks(_section(raw, "tasks", problems), problems)
    for task in tasks.values():
        if pricing.for_model(task.model) is None:
            problems.append(
                f"task {task.name!r}: no price configured for model {task.model!r} in [pricing.models]"
            )
    log_level = _log_level(_section(raw, "logging", problems), env, problems)
    if problems:
        return None
    return Config(
        database_url=database_url,
        warehouse_url=warehouse_url,
        api_key=api_key,
        api_key_sources=key_sources,
        base_url=base_url,
        api_timeout_seconds=api_timeout,
        tasks=tasks,
        pricing=pricing,
        submit=submit,
        collect=collect,
        schedule=schedule,
        source=source,
        log_level=log_level,
        live=live,
        metrics=metrics,
        warnings=tuple(warnings),
    )


def _ignoring(section: Mapping[str, Any], where: str, warnings: list[str]) -> Mapping[str, Any]:
    """The section without the settings an older version read (IGNORED), each named in `warnings`."""
    kept = {}
    for key, value in section.items():
        why = IGNORED.get(f"{where}.{key}")
        if why is None:
            kept[key] = value
        else:
            warnings.append(f"{where}.{key} is ignored ({why}); it can be removed from the file")
    return kept


def _database_urls(
    db: Mapping[str, Any], env: Mapping[str, str], base_dir: Path, problems: list[str]
) -> tuple[str, str]:
    """[database]: the queue database's and the warehouse's URLs, each with its password."""
    database_url = env.get("ETL_DATABASE_URL") or _typed(
        db, "url", str, "sqlite:///var/etl.db", "database", problems
    )
    warehouse_url = env.get("ETL_WAREHOUSE_URL") or _typed(db, "warehouse_url", str, "", "database", problems)
    database_url = _sqlite_url_relative_to(database_url, base_dir)
    warehouse_url = _sqlite_url_relative_to(warehouse_url, base_dir) if warehouse_url else database_url
    same = warehouse_url == database_url
    database_url = _with_password(database_url, env, DB_PASSWORD_CREDENTIAL, problems)
    warehouse_url = (
        database_url if same else _with_password(warehouse_url, env, WH_PASSWORD_CREDENTIAL, problems)
    )
    urls = [("database url", database_url)]
    if warehouse_url != database_url:
        urls.append(("warehouse url", warehouse_url))
    for label, url in urls:
        if not url.startswith(SQL_SCHEMES):
            problems.append(
                f"{label} {mask_url(url)!r} is neither sqlite:///PATH nor postgresql:// (or postgres://)"
            )
    return database_url, warehouse_url


def _api(api: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> tuple[str | None, float]:
    """[api]: the base URL (None: the SDK's own) and the timeout."""
    base_url = env.get("ANTHROPIC_BASE_URL") or _typed(api, "base_url", str, "", "api", problems) or None
    if base_url:
        given_by = "ANTHROPIC_BASE_URL" if env.get("ANTHROPIC_BASE_URL") else "api.base_url"
        problem = base_url_problem(base_url, given_by)
        if problem:
            problems.append(problem)
    api_timeout = float(_typed(api, "timeout_seconds", (int, float), 60.0, "api", problems))
    _positive(api_timeout, "api.timeout_seconds", problems)
    return base_url, api_timeout


def _submit(section: Mapping[str, Any], problems: list[str]) -> SubmitSettings:
    submit = _settings(SubmitSettings, section, "submit", problems)
    for name, value in submit.__dict__.items():
        if name != "max_cost_usd_per_night":
            _positive(value, f"submit.{name}", problems)
    if submit.max_cost_usd_per_night < 0:
        problems.append("submit.max_cost_usd_per_night cannot be negative (0 means no cap)")
    if not 0 < submit.count_tokens_confidence < 1:
        problems.append("submit.count_tokens_confidence must be between 0 and 1, e.g. 0.95")
    if submit.max_requests_per_batch > 100_000:
        problems.append(
            f"submit.max_requests_per_batch is {submit.max_requests_per_batch}; the API allows 100000"
        )
    if submit.max_batch_bytes >= 256 * 1000 * 1000:
        problems.append(
            f"submit.max_batch_bytes is {submit.max_batch_bytes}; the API refuses 256 MB and over"
        )
    if submit.max_body_bytes > submit.max_batch_bytes:
        problems.append(
            "submit.max_body_bytes is larger than submit.max_batch_bytes: no such document could be sent"
        )
    return submit


def _collect(section: Mapping[str, Any], problems: list[str]) -> CollectSettings:
    collect = _settings(CollectSettings, section, "collect", problems)
    for name, value in collect.__dict__.items():
        if name != "stream_retries":
            _positive(value, f"collect.{name}", problems)
    if collect.late_after_days >= 29:
        problems.append(
            "collect.late_after_days must be under 29: results are archived 29 days after creation"
        )
    return collect


def _schedule(section: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> ScheduleSettings:
    """[schedule]; ETL_TIMEZONE overrides `timezone`."""
    schedule = _settings(ScheduleSettings, section, "schedule", problems)
    if env.get("ETL_TIMEZONE"):
        schedule = ScheduleSettings(**{**schedule.__dict__, "timezone": env["ETL_TIMEZONE"]})
    try:
        ZoneInfo(schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"schedule.timezone {schedule.timezone!r} is not a known IANA time zone")
    for name in ("submit_cron", "collect_cron"):
        expr = getattr(schedule, name)
        parts = expr.split()
        if len(parts) != 5 or not all(CRON_FIELD.match(p) for p in parts):
            problems.append(
                f"schedule.{name} {expr!r} is not a 5-field cron expression (minute hour day month weekday)"
            )

    if not re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", schedule.retry_until):
        problems.append(f"schedule.retry_until {schedule.retry_until!r} is not a time of day like 06:00")
    for name in ("retry_backoff_seconds", "retry_backoff_max_seconds"):
        _positive(getattr(schedule, name), f"schedule.{name}", problems)
    return schedule


def _live(section: Mapping[str, Any], problems: list[str]) -> LiveSettings:
    live = _settings(LiveSettings, section, "live", problems)
    for name, value in live.__dict__.items():
        if name in ("daily_spend_cap_usd", "slot_hold_minutes"):
            if value < 0:
                none = "no cap" if name == "daily_spend_cap_usd" else "no hold"
                problems.append(f"live.{name} must be 0 ({none}) or positive, got {value!r}")
        elif name != "enabled":
            _positive(value, f"live.{name}", problems)
    return live


def _log_level(section: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> str:
    """[logging] level, lower case; ETL_LOG_LEVEL overrides it."""
    log_level = str(env.get("ETL_LOG_LEVEL") or _typed(section, "level", str, "info", "logging", problems))
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        problems.append(f"logging.level {log_level!r} is not one of debug, info, warning, error")
    return log_level.lower()


def _metrics(section: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> MetricsSettings:
    """[metrics]; ETL_METRICS_LISTEN overrides `listen` (set to `off`, it turns the page off)."""
    metrics = _settings(MetricsSettings, section, "metrics", problems)
    where = "metrics.listen"
    if "ETL_METRICS_LISTEN" in env:
        metrics, where = MetricsSettings(listen=env["ETL_METRICS_LISTEN"]), "ETL_METRICS_LISTEN"
    try:
        listen_address(metrics.listen)
    except ValueError as exc:
        problems.append(f"{where}: {exc}")
    return metrics


def _settings(cls: type[_S], section: Mapping[str, Any], where: str, problems: list[str]) -> _S:
    """A settings dataclass from its TOML table: each field typed like its default, unknown keys reported."""
    values = {
        name: _typed(
            section,
            name,
            (int, float) if isinstance(default, (float, Decimal)) else type(default),
            default,
            where,
            problems,
        )
        for name, default in cls().__dict__.items()
    }
    for name, default in cls().__dict__.items():
        if isinstance(default, Decimal):
            values[name] = decimal_of(values[name])
    _check_unknown(section, cls, where, problems)
    return cls(**values)


def _check_unknown(section: Mapping[str, Any], cls: type, where: str, problems: list[str]) -> None:
    allowed = set(getattr(cls, "__dataclass_fields__", {}))
    for key in section:
        if key not in allowed:
            problems.append(f"unknown setting {where}.{key} (known: {', '.join(sorted(allowed))})")


def decimal_of(value: Any) -> Decimal:
    """A TOML number as the Decimal its author wrote: `0.1` is 0.1, not the float nearest to it."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {value!r}")
    try:
        out = Decimal(repr(value) if isinstance(value, float) else value)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not out.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return out


def _price(value: str) -> Decimal:
    return Decimal(value)


DEFAULT_PRICES = {
    "claude-haiku-4-5": ModelPrice(_price("1"), _price("5")),
    "claude-sonnet-4-5": ModelPrice(_price("3"), _price("15")),
    "claude-sonnet-4-6": ModelPrice(_price("3"), _price("15")),
    "claude-opus-4-5": ModelPrice(_price("5"), _price("25")),
    "claude-opus-4-1": ModelPrice(_price("15"), _price("75")),
}


def _pricing(section: Mapping[str, Any], problems: list[str]) -> Pricing:
    models: dict[str, ModelPrice] = dict(DEFAULT_PRICES)
    raw_models = section.get("models", {})
    if not isinstance(raw_models, Mapping):
        problems.append("[pricing.models] must be a table of model = { input = ..., output = ... }")
        raw_models = {}
    for name, spec in raw_models.items():
        if not isinstance(spec, Mapping):
            problems.append(f"pricing.models.{name} must be a table with input and output prices")
            continue
        try:
            price = ModelPrice(decimal_of(spec["input"]), decimal_of(spec["output"]))
        except (KeyError, TypeError, ValueError):
            problems.append(f"pricing.models.{name} needs numeric input and output (USD per million tokens)")
            continue
        if price.input < 0 or price.output < 0:
            problems.append(f"pricing.models.{name}: prices cannot be negative")
        models[name] = price
    values = {}
    for key, default in (
        ("batch_discount", 0.5),
        ("cache_write_5m", 1.25),
        ("cache_write_1h", 2.0),
        ("cache_read", 0.1),
    ):
        values[key] = decimal_of(_typed(section, key, (int, float), default, "pricing", problems))
    if not 0 < values["batch_discount"] <= 1:
        problems.append("pricing.batch_discount must be in (0, 1]; the Batches API charges 0.5 of standard")
    for key in section:
        if key not in {*values, "models"}:
            problems.append(f"unknown setting pricing.{key}")
    return Pricing(models=models, **values)


TASK_SETTINGS = frozenset(
    {
        "model",
        "system",
        "template",
        "max_tokens",
        "output_schema",
        "cache_system",
        "max_cost_usd_per_night",
        "live",
    }
)


def _tasks(section: Mapping[str, Any], problems: list[str]) -> dict[str, Task]:
    if not section:
        problems.append("no [tasks.<name>] defined; at least [tasks.default] is needed")
        return {}
    tasks: dict[str, Task] = {}
    for name, spec in section.items():
        where = f"tasks.{name}"
        if len(name.encode("utf-8")) > MAX_TASK_NAME_BYTES:
            problems.append(
                f"[tasks.{name[:40]}...]: a task name may be at most {MAX_TASK_NAME_BYTES} bytes "
                "(it is part of the warehouse's unique key)"
            )
        if not isinstance(spec, Mapping):
            problems.append(f"[{where}] must be a table")
            continue
        tasks[name] = _task(name, spec, where, problems)
    if "default" not in tasks and tasks:
        problems.append("no [tasks.default]: rows inserted without a task name would have nowhere to go")
    return tasks


def _task(name: str, spec: Mapping[str, Any], where: str, problems: list[str]) -> Task:
    """One [tasks.NAME] table; each bad value is a problem and stands in as its default meanwhile."""
    for key in spec:
        if key not in TASK_SETTINGS:
            problems.append(f"unknown setting {where}.{key} (known: {', '.join(sorted(TASK_SETTINGS))})")
    model = spec.get("model")
    if not isinstance(model, str) or not model:
        problems.append(f'{where}.model is required (e.g. "claude-haiku-4-5")')
        model = ""
    template, fields = _template(spec.get("template", "{body}"), where, problems)
    max_tokens = spec.get("max_tokens", 1024)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        problems.append(f"{where}.max_tokens must be a positive integer, got {max_tokens!r}")
        max_tokens = 1
    system = spec.get("system", "")
    if not isinstance(system, str):
        problems.append(f"{where}.system must be a string")
        system = ""
    schema = spec.get("output_schema")
    if schema is not None and (not isinstance(schema, Mapping) or schema.get("type") != "object"):
        problems.append(f'{where}.output_schema must be a JSON schema table whose type is "object"')
        schema = None
    cache_system = spec.get("cache_system", False)
    if not isinstance(cache_system, bool):
        problems.append(f"{where}.cache_system must be true or false")
        cache_system = False
    if cache_system and not system:
        problems.append(f"{where}.cache_system is true but the task has no system prompt to cache")
    live = spec.get("live", True)
    if not isinstance(live, bool):
        problems.append(f"{where}.live must be true or false (may urgent rows use the live API?)")
        live = True
    return Task(
        name=name,
        model=model,
        template=template,
        max_tokens=max_tokens,
        system=system,
        output_schema=schema,
        cache_system=cache_system,
        template_fields=fields,
        live=live,
        max_cost_usd_per_night=_task_cap(spec.get("max_cost_usd_per_night"), where, problems),
    )


def _template(template: Any, where: str, problems: list[str]) -> tuple[str, tuple[str, ...]]:
    """A task's template and the fields it names, in order, once each."""
    fields: tuple[str, ...] = ()
    if not isinstance(template, str):
        problems.append(f"{where}.template must be a string")
        return "{body}", fields
    try:
        fields = tuple(dict.fromkeys(fname for _, fname, _, _ in string.Formatter().parse(template) if fname))
    except ValueError as exc:
        problems.append(f"{where}.template is not a valid template: {exc}")
    for fname in fields:
        if not fname.isidentifier():
            problems.append(
                f"{where}.template field {{{fname}}} must be a plain name: body, doc_key, task or a metadata key"
            )
    return template, fields


def _task_cap(raw_cap: Any, where: str, problems: list[str]) -> Decimal | None:
    """A task's own nightly cap: None when it has none."""
    if raw_cap is None:
        return None
    if isinstance(raw_cap, bool) or not isinstance(raw_cap, (int, float)) or raw_cap <= 0:
        problems.append(f"{where}.max_cost_usd_per_night must be a positive number of USD, got {raw_cap!r}")
        return None
    return decimal_of(raw_cap)
