"""The project's exceptions: one root, one subtree per boundary."""

from __future__ import annotations


class EtlError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(EtlError):
    """The configuration is unusable; `problems` lists every reason at once."""

    exit_code = 78  # EX_CONFIG: systemd's RestartPreventExitStatus keeps it from looping

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"configuration has {len(self.problems)} problem(s):\n{lines}")

    @classmethod
    def one(cls, problem: str) -> ConfigError:
        """A single problem that makes every other check meaningless: said in one line."""
        err = cls([problem])
        Exception.__init__(err, problem)
        return err


class MissingApiKey(ConfigError):
    """No API key anywhere it is looked for: one line saying where those places are."""

    def __init__(self, sources: list[str]) -> None:
        super().__init__([f"no Anthropic API key found; it is looked for in: {'; '.join(sources)}"])
        Exception.__init__(self, self.problems[0])


class StoreError(EtlError):
    """The database is unusable or in the wrong shape."""


class SchemaOutOfDate(StoreError):
    exit_code = 78


class SchemaIncomplete(SchemaOutOfDate):
    """The revision is current but a table of the database's role is missing."""


class DatabaseUnreachable(StoreError):
    """A database did not answer at start-up (wrong host, port, name, credentials): a configuration
    problem, so the configuration exit code (systemd does not restart-loop on it)."""

    exit_code = 78


class MissingPrivilege(StoreError):
    """The database user lacks a right the command needs (PostgreSQL's "permission denied"): a deployment
    problem, fixed by the owner with `etl db grants --apply`, so the configuration exit code."""

    exit_code = 78


class InputError(EtlError):
    """An input file (or a command's arguments about it) is unusable; nothing from it was stored."""

    exit_code = 65  # EX_DATAERR


class InputMissing(InputError):
    """The input file does not exist or cannot be opened."""

    exit_code = 66  # EX_NOINPUT


class ProviderError(EtlError):
    """A Batches API call failed. `kind` says what the caller may do about it.

    kinds:
      - ``ambiguous``: the request may or may not have taken effect (timeout, reset, 5xx, 529).
      - ``rejected``: the API refused the request itself (400, 404, 413...): it did not take effect.
      - ``rate_limited``: 429 without a spend-limit code: nothing happened, try later.
      - ``systemic``: spend limit, authentication, permission or billing: stop and tell a human.
      - ``not_found``: the object does not exist (or is not visible yet).
      - ``transient``: a read failed in a way that retrying later may fix.
      - ``unreachable``: no connection to the API could be made: nothing was sent, try later.
      - ``misconfigured``: the API has no such endpoint (404 on create: a wrong base URL): nothing
        happened; trying again cannot help until the configuration is fixed.
    """

    def __init__(
        self, message: str, *, kind: str, status: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.headers: dict[str, str] = {}  # rate-limit headers of the answer (the live path reads them)

    @property
    def transient(self) -> bool:
        return self.kind in {"ambiguous", "rate_limited", "transient", "not_found", "unreachable"}


class ResultsIncomplete(ProviderError):
    """A results stream ended, broke or stalled before every result arrived."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="transient")


class ResultsGone(ProviderError):
    """The batch's results are archived (29 days after creation) or otherwise unavailable for good."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="rejected")


class SubmissionPaused(EtlError):
    """Submission is paused by a systemic failure until an operator runs `etl resume`."""

    exit_code = 75  # EX_TEMPFAIL


class Environmental(EtlError):
    """The machine, not the data or the configuration, stopped the work: a full disk, a read-only database
    or file system, a permission refused, memory exhausted. Nothing was lost (every write is a transaction
    that either happened or did not); fix the cause and run again. Its exit code (74, EX_IOERR) is one the
    systemd unit restarts, so the daemon comes back on its own once space is freed."""

    exit_code = 74


# SQLite's own words for an environmental failure, as its error messages carry them.
_SQLITE_WORDS = (
    ("database or disk is full", "disk full"),
    ("disk i/o error", "disk I/O error (often a full disk)"),
    ("attempt to write a readonly database", "read-only database"),
    ("readonly database", "read-only database"),
    ("unable to open database file", "cannot open the database file"),
    ("out of memory", "out of memory"),
)
# PostgreSQL SQLSTATEs of the same kind: class 53 (insufficient resources), 58030 (I/O error), 25006
# (read-only transaction: a standby or default_transaction_read_only).
_PG_STATES = {
    "53100": "disk full on the database server",
    "53200": "the database server is out of memory",
    "53000": "the database server lacks resources",
    "53300": "the database server has too many connections",
    "58030": "I/O error on the database server",
    "25006": "read-only database (a standby, or default_transaction_read_only)",
}
_ERRNO_WORDS = {28: "disk full", 122: "disk quota exceeded", 30: "read-only file system", 13: "permission denied", 1: "permission denied", 12: "out of memory"}  # fmt: skip
_WHAT_TO_DO = (
    "nothing was lost: what was being written was rolled back and is done again on the next run; "
    "free space / fix the permission or mount, then run again (the daemon is restarted by systemd)"
)


def environmental(exc: BaseException, where: str = "") -> Environmental | None:
    """The one place that says whether an exception is the machine's fault rather than the data's or the
    configuration's, and words it: `None` when it is not. Looks through SQLAlchemy's wrapper (`orig`) and
    `__cause__` chains; matched by errno, SQLSTATE or SQLite's own message, never by exception class alone,
    so a driver swap does not change the answer. (Database role and grant errors are worded where they are
    raised; a permission refused by the database can be added to `_PG_STATES` here.)"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        what = _environment_words(current)
        if what is not None:
            place = f" ({where})" if where else ""
            detail = " ".join(str(current).split())[:200]
            return Environmental(f"{what}{place}: {detail}; {_WHAT_TO_DO}")
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None


def _environment_words(exc: BaseException) -> str | None:
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate in _PG_STATES:
        return _PG_STATES[sqlstate]
    if type(exc).__module__ == "sqlite3":
        text = str(exc).lower()
        for words, what in _SQLITE_WORDS:
            if words in text:
                return what
    return None


def clean(text: str, limit: int = 500) -> str:
    """A text from outside (an API message, a driver's error) made storable and one line: lone surrogates
    and NUL written as escapes (SQLite's driver and PostgreSQL refuse them), at most `limit` characters."""
    text = " ".join(str(text).split())
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit]


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` of any exception (a driver's own, not SQLAlchemy's statement dump)."""
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return clean(f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": "), 300)
