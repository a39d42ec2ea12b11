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
