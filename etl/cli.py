"""The `etl` command. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog

from etl import __version__, failpoints, logs, moments
from etl import config as config_mod
from etl.errors import ConfigError, EtlError, SubmissionPaused, environmental
from etl.parts import Parts
from etl.store.engine import denied

log = structlog.get_logger("etl.cli")


EXIT_CODES = {
    0: "success",
    1: "failure (the message says what happened)",
    2: "wrong command-line usage",
    3: "the job finished but reported problems (listed on stderr)",
    65: "a bad input file or argument: nothing from it was stored",
    66: "the input file does not exist or cannot be read",
    74: "the machine stopped the work (disk full, read-only, permission, memory): fix it, run again",
    75: "submission is paused until `etl resume`: the API refused the key, billing or spend limit",
    141: "the reader of the output went away (`etl report | head -1`): stopped quietly",
    78: "configuration problem: config file, schema out of date, database unreachable or refusing a right "
    "(`etl db grants`), no API key",
}
CONFIG_ENV = {
    "ETL_CONFIG": "path of the config file",
    "ETL_DATABASE_URL": "queue database URL (sqlite:///PATH, postgresql:// or postgres://)",
    "ETL_WAREHOUSE_URL": "warehouse URL (default: the queue database)",
    "ETL_TIMEZONE": "schedule time zone",
    "ETL_LOG_LEVEL": "log level (debug, info, warning, error)",
    "ETL_METRICS_LISTEN": "where `etl run` serves its metrics page: HOST:PORT, or off",
}
API_ENV = {
    "ANTHROPIC_API_KEY": "the API key",
    "CREDENTIALS_DIRECTORY": "credentials folder (systemd; the image: /run/secrets): anthropic_api_key, "
    "database_password, warehouse_password",
    "ANTHROPIC_BASE_URL": "another API origin, e.g. http://127.0.0.1:8765 (the emulator; no /v1)",
}


def _epilog(codes: Sequence[int], *, api: bool = False, config: bool = True, extra: str = "") -> str:
    env = {**(CONFIG_ENV if config else {}), **(API_ENV if api else {})}
    parts = [extra] if extra else []
    parts.append("exit codes:\n" + "\n".join(f"  {c:<3} {EXIT_CODES[c]}" for c in codes))
    if env:
        parts.append("environment:\n" + "\n".join(f"  {k:<22} {v}" for k, v in env.items()))
    return "\n\n".join(parts)


BASIC = (0, 1, 2, 74, 78)
GLOBAL_OPTIONS = "options of every command, before or after it: --config FILE, --log-level LEVEL, --log-json (`etl --help`)"


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error shape: one line on stderr naming the fix, exit 2."""

    def error(self, message: str) -> NoReturn:
        where = "" if self.prog == "etl" else f"{self.prog.removeprefix('etl ')}: "
        self.exit(2, f"etl: {where}{message} (see: {self.prog} --help)\n")


def _global_options(p: argparse.ArgumentParser, *, default: Any) -> None:
    """Options of every command, accepted before the command or after it (`etl status --config F`)."""
    p.add_argument(
        "--config",
        type=Path,
        default=default,
        help="config file (default: $ETL_CONFIG, ./config/etl.toml, /etc/etl/etl.toml)",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=list(logs.LEVELS),
        default=default,
        help="override logging.level: debug, info, warning or error",
    )
    p.add_argument(
        "--log-json",
        action="store_true",
        default=default if default is argparse.SUPPRESS else None,
        help="JSON log lines even on a terminal",
    )


def _parser() -> argparse.ArgumentParser:
    """The whole command line: the global options, then each command's own part (in `etl --help` order)."""
    p = _Parser(
        prog="etl",
        description="Run a company's document LLM processing through Anthropic's Message Batches API.",
        epilog=_epilog(sorted(EXIT_CODES), api=True, extra="`etl COMMAND --help` describes each command."),
        formatter_class=FORMATTER,
    )
    p.add_argument("--version", action="version", version=f"etl {__version__}")
    _global_options(p, default=None)
    p.add_argument(
        "--json", action="store_true", help="machine-readable output, for the commands that print a reading"
    )
    # The same options after the command; SUPPRESS keeps a value given before it when they are absent.
    common = _Parser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = _Commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    for add in COMMAND_PARSERS:
        add(commands)
    commands.sub.add_parser(
        "emulator", help="run the local Batches API emulator (see: etl emulator --help)", add_help=False
    )
    return p


FORMATTER = argparse.RawDescriptionHelpFormatter


@dataclass(frozen=True)
class _Commands:
    """Where each command's part of the parser is added, with the project's help layout."""

    sub: argparse._SubParsersAction[Any]
    common: argparse.ArgumentParser

    def add(
        self,
        name: str,
        summary: str,
        codes: Sequence[int] = BASIC,
        *,
        details: str = "",
        api: bool = False,
        epilog: str | None = None,
        description: str | None = None,
        sub: argparse._SubParsersAction[Any] | None = None,
    ) -> argparse.ArgumentParser:
        """A command (or, with `sub`, an action of one): its summary is its help and its description's
        first line unless `description` is given; `epilog` replaces the usual exit codes, global options
        and environment."""
        if description is None:
            description = summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else "")
        parser: argparse.ArgumentParser = (sub or self.sub).add_parser(
            name,
            parents=[self.common],
            help=summary,
            description=description,
            epilog=_epilog(codes, api=api, extra=GLOBAL_OPTIONS) if epilog is None else epilog,
            formatter_class=FORMATTER,
        )
        return parser


def _db_parser(c: _Commands) -> None:
    db = c.add("db", "database schema: create, migrate or check it; the roles' grants")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")

    def action(name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
        return c.add(name, summary, description=description, epilog=_epilog(BASIC), sub=db_sub)

    action(
        "upgrade",
        "create or migrate the schema (queue database and warehouse)",
        "Create or migrate the schema of the queue database and the warehouse.",
    )
    action(
        "check",
        "exit non-zero unless the schema is current",
        "Exit 78 unless both databases are at the schema this version needs.",
    )
    grants = action(
        "grants",
        "print (or --apply) the SQL giving the producer, reader and daemon roles their rights",
        "PostgreSQL: print the SQL that makes three roles hold exactly their rights, or apply it\n"
        "with --apply (run it as the owner, after `etl db upgrade`, and again after each upgrade):\n"
        "  producer  INSERT of doc_key, body, task, metadata, priority, due_by, mode on etl_queue\n"
        "  reader    SELECT on etl_results, etl_reports, etl_events\n"
        "  daemon    what `etl run` needs and no more: no DDL, no TRUNCATE, not the owner\n"
        "Missing roles are made NOLOGIN; log in as a member (CREATE ROLE app LOGIN IN ROLE etl_producer).\n"
        "docs/deploy.md has a worked example. SQLite has no roles: its file's permissions are the rights.",
    )
    grants.add_argument(
        "--apply", action="store_true", help="run the SQL (as the owner) instead of printing it"
    )
    for kind in ("producer", "reader", "daemon"):
        grants.add_argument(f"--{kind}", default=f"etl_{kind}", metavar="ROLE", help=f"default: etl_{kind}")
    for name, summary in (
        ("current", "the schema revision of each database and the one this version needs; changes nothing"),
        ("history", "every migration this version knows, oldest first, marking where each database is"),
    ):
        _json_option(action(name, summary), "machine-readable output")


def _enqueue_parser(c: _Commands) -> None:
    enq = c.add(
        "enqueue",
        "add documents from a JSONL or CSV file ('-' for stdin)",
        (0, 1, 2, 65, 66, 74, 78),
        details="A file goes in whole or not at all: a broken line, a row without doc_key and body, or a\n"
        "row naming a task that is not configured stops it with the line's number and nothing is kept,\n"
        "so the fixed file can simply be enqueued again. Keys other than doc_key, body, task, priority\n"
        "and metadata become metadata.",
    )
    enq.add_argument("file", help="path, or - for standard input")
    enq.add_argument("--format", choices=["jsonl", "csv"], help="default: from the file name, else jsonl")
    enq.add_argument("--task", help="task for rows that name none (default: 'default'); must be configured")
    enq.add_argument("--batch-rows", type=int, default=5000, help=argparse.SUPPRESS)


def _submit_parsers(c: _Commands) -> None:
    """`submit` and `estimate`, which share the selection of what to price."""
    sm = c.add(
        "submit",
        "the nightly job, now: reconcile, claim queued rows, send batches",
        (0, 1, 2, 3, 74, 75, 78),
        api=True,
        details="The API key, the pause and the schema are checked before a row is claimed; rows that\n"
        "could not be sent go back to the queue at once. When nothing is sent it says why.",
    )
    sm.add_argument(
        "--dry-run", action="store_true", help="print what it would cost (as `etl estimate`); send nothing"
    )
    _json_option(sm, argparse.SUPPRESS)
    _estimate_arguments(sm, suppress=True)
    est = c.add(
        "estimate",
        "what the queue would cost, per task and model; nothing is claimed or sent",
        details="Input tokens are estimated locally (4 characters a token) or, with --count-tokens, from a\n"
        "sample counted by the API's free count_tokens; output at max_tokens (an upper bound). The\n"
        "nightly cap, what is reserved tonight and how many documents fit under it are shown too.",
    )
    _estimate_arguments(est)


def _collect_parsers(c: _Commands) -> None:
    """`collect` and `reconcile`."""
    col = c.add(
        "collect",
        "the morning job, now: collect ended batches, then the report",
        (0, 1, 2, 3, 74, 75, 78),
        api=True,
        details="On a terminal the morning report is printed readable (as `etl report` does); off a\n"
        "terminal it is one JSON log line.",
    )
    col.add_argument("--no-report", action="store_true", help="do not produce the morning report")
    rec = c.add(
        "reconcile",
        "settle batch creates whose outcome is unknown",
        api=True,
        details="An unknown create is released only once the API's list proves no batch holds its rows\n"
        "(docs/survival.md); `etl status` says when. --release INTENT releases one now, on your word.",
    )
    rec.add_argument(
        "--release",
        type=int,
        metavar="INTENT",
        help="put the rows of this unknown intent (see etl status) back in the queue now, on your word that "
        "the API holds no batch of them. RISK: if that batch does exist, its rows are sent and billed twice",
    )
    rec.add_argument(
        "--acknowledge",
        metavar="BATCH_ID",
        help="an unexplained batch of ours (etl status names it: billed, no intent can take it) is known to "
        "you: stop failing etl status --check on it (the morning report keeps the record)",
    )


def _status_parsers(c: _Commands) -> None:
    """`status` and `report`: the readings."""
    st = c.add(
        "status",
        "queue counts, pending batches, deadlines, last runs",
        details="With --check: exit 1 whenever anything is stuck or late, each cause on its own line\n"
        "(README: the status --check truth table); 78 when the schema is behind or incomplete.",
    )
    _json_option(st, "machine-readable output")
    st.add_argument(
        "--check",
        action="store_true",
        help="health check: exit 1 if anything is stuck or late (README: the status --check truth table)",
    )
    rep = c.add("report", "print the last morning report")
    _json_option(rep, "the report as JSON")
    rep.add_argument(
        "--now", action="store_true", help="build a fresh report instead of printing the last one"
    )
    rep.add_argument(
        "--since",
        type=moments.argument,
        metavar="TIME",
        help="a fresh report from TIME: 30d, 12h, 2w ago or an ISO date/time (implies --now)",
    )


def _pause_parsers(c: _Commands) -> None:
    """`resume` and `pause`."""
    c.add("resume", "lift a submission pause after fixing its cause (spend limit, key, billing)")
    pause = c.add(
        "pause",
        "pause submission now (the nightly submit sends nothing) until `etl resume`",
        details="The same pause a wrong key or a spend limit sets: `etl status` shows it with its reason,\n"
        "`etl status --check` fails, `etl submit` exits 75. Batches already sent are still collected.",
    )
    pause.add_argument(
        "reason", nargs="?", default="paused by the operator", help="why (shown by etl status)"
    )


def _retry_parser(c: _Commands) -> None:
    ret = c.add(
        "retry",
        "send dead and rejected documents again",
        (0, 1, 2, 65, 74, 78),
        details="Selected rows go back to `queued` with their attempts reset; their old reason is kept after\n"
        "'retried; was dead:'. Every given selector must match. Without any selector, --all is needed.\n"
        "Times, as for every --since/--until/--older-than: an ISO date/time (UTC unless it says\n"
        "otherwise) or a duration ago (90s, 90m, 24h, 7d, 2w); a bad one is a usage error (exit 2).",
    )
    ret.add_argument("doc_keys", nargs="*", metavar="DOC_KEY", help="only these documents")
    ret.add_argument("--task", help="only rows of this task")
    ret.add_argument("--reason", metavar="TEXT", help="only rows whose reason contains TEXT (any case)")
    ret.add_argument(
        "--since", type=moments.argument, metavar="TIME", help="only rows that failed at or after TIME"
    )
    ret.add_argument(
        "--until", type=moments.argument, metavar="TIME", help="only rows that failed before TIME"
    )
    which = ret.add_mutually_exclusive_group()
    which.add_argument("--dead", action="store_true", help="only dead rows")
    which.add_argument("--rejected", action="store_true", help="only rejected rows")
    ret.add_argument("--all", action="store_true", help="retry every dead and rejected row")
    ret.add_argument("--dry-run", action="store_true", help="show what would be retried, change nothing")
    _json_option(ret, "machine-readable output")


def _cancel_parser(c: _Commands) -> None:
    can = c.add(
        "cancel",
        "cancel pending batches at the API",
        (0, 1, 2, 3, 65, 74, 78),
        api=True,
        details="Requests the model has not processed yet are canceled (not billed) and go back to the queue\n"
        "without using an attempt; requests already processed are collected as usual. When the batch\n"
        "has ended by the time the API answers, its rows are settled at once; otherwise by the next\n"
        "collect (the daemon polls).",
    )
    can.add_argument("batch_ids", nargs="*", metavar="BATCH_ID", help="batch ids from `etl status`")
    can.add_argument("--all-pending", action="store_true", help="cancel every pending batch")
    can.add_argument(
        "--dry-run", action="store_true", help="list the batches it would cancel; ask the API nothing"
    )
    _json_option(can, "machine-readable output (with --dry-run)")


def _service_parsers(c: _Commands) -> None:
    """`config`, `metrics`, `run`, `live` and `demo`."""
    c.add(
        "config",
        "print the whole effective configuration as TOML, secrets masked",
        details="The output is a valid config file: the file's settings, the defaults and the environment\n"
        "overrides, after validation.",
    )
    c.add(
        "metrics",
        "print the Prometheus metrics page once (for node_exporter's textfile collector or cron)",
        details="The page `etl run` serves at [metrics] listen, read from the database now; the daemon's own\n"
        "process counters are left out. docs/deploy.md lists the metrics and the alert rules.",
    )
    c.add(
        "run",
        "the daemon: scheduled submit and collect, polling, systemd notify",
        (0, 1, 2, 74, 78),
        api=True,
    )
    live = c.add(
        "live",
        "the live path alone: urgent rows through the Messages API now",
        (0, 1, 2, 74, 78),
        api=True,
        details="Urgent rows are those with mode = 'live' or a due_by the next batch cannot meet (README,\n"
        '"Urgent documents"). `etl run` runs the same worker; this is for cron or a second worker.',
    )
    live.add_argument("--once", action="store_true", help="process the urgent rows waiting now, then exit")
    demo = c.add(
        "demo", "the whole cycle in under a minute on a fresh SQLite file, no API key needed", (0, 1, 2)
    )
    demo.add_argument("--dir", type=Path, help="where to put the demo database (default: a temporary folder)")
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")


COMMAND_PARSERS: tuple[Callable[[_Commands], None], ...] = (
    _db_parser,
    _enqueue_parser,
    _submit_parsers,
    _collect_parsers,
    _status_parsers,
    _pause_parsers,
    _retry_parser,
    _cancel_parser,
    _service_parsers,
)


def _json_option(p: argparse.ArgumentParser, text: str) -> None:
    """`--json` after the command; SUPPRESS keeps `etl --json COMMAND` (the global flag) when absent."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=text)


def _estimate_arguments(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    def helped(text: str) -> str:
        return argparse.SUPPRESS if suppress else text

    p.add_argument("--task", help=helped("only this task's documents"))
    p.add_argument("--min-priority", type=int, help=helped("only documents of at least this priority"))
    p.add_argument(
        "--older-than",
        type=moments.argument,
        metavar="TIME",
        help=helped("only documents queued before TIME: 2d, 12h ago or an ISO date/time"),
    )
    p.add_argument(
        "--count-tokens",
        action="store_true",
        help=helped(
            "count input tokens of a sample with the API's free count_tokens (submit.count_tokens_sample)"
        ),
    )
    if not suppress:
        _json_option(p, "machine-readable output (money as decimal strings)")


def main(argv: Sequence[str] | None = None) -> int:
    """The `etl` command. Without `argv` it is the process's own command (the console script, `python -m
    etl.cli`), and the process exits once it returns."""
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a reader that left shows here, inside the handler below, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    finally:
        if argv is None:
            # Interpreter teardown runs the cyclic collector over every object still alive, most of them
            # the SDK's (2,900 modules): 0.3 s of every command, however little it did. Frozen objects
            # are skipped; they are freed all the same when the process exits.
            gc.freeze()


def _reader_gone() -> int:
    """The reader of our output went away (`etl report | head -1`): stop quietly, as `git log | head`
    does, with the shell's code for a SIGPIPE death. Standard output now points at /dev/null, so the
    interpreter's last flush finds nowhere to fail. Work done before the print is committed already."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "emulator":
        from etl.emulator.cli import main as emulator_main

        return emulator_main(argv[1:])
    args = _parse(argv)
    env = dict(os.environ)
    try:
        failpoints.configure(env)
    except ValueError as exc:
        print(f"etl: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":
        logs.configure(args.log_level or "warning", json=args.log_json)
        from etl.demo import run_demo

        return run_demo(directory=args.dir, keep=args.keep)
    cfg = _configure(args, env)
    if isinstance(cfg, int):
        return cfg
    handler = COMMANDS[args.command]
    try:
        _refuse_missing_sqlite(cfg, args)
        parts = Parts.open(cfg)
    except Exception as exc:  # the top of the CLI: one line, never a traceback
        return _fail(exc)
    try:
        try:
            code, cause = handler(parts, args), getattr(args, "failure", None)
        except BrokenPipeError:
            raise  # not a failure of the command: the reader left (below)
        except Exception as exc:  # the top of the CLI: one line, never a traceback
            code, cause = _failure(exc, user=parts.db.main.url.username)
            print(f"etl: {cause}", file=sys.stderr)
        if args.command in ("submit", "collect") and not getattr(args, "dry_run", False):
            from etl import failures

            failures.note(
                parts.db, parts.clock, args.command, code, cause
            )  # where `etl status --check` reads it
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # `main` ends it quietly with 141: the reader left (`etl report | head -1`)
    finally:
        try:
            parts.close()
        except Exception as exc:  # closing the pool on a full disk: already said, or nothing to say
            log.debug("close_failed", error=str(exc))


def _configure(args: argparse.Namespace, env: dict[str, str]) -> config_mod.Config | int:
    """The configuration, with logging set up from it and its secrets kept out of the log; or the exit
    code after saying what is wrong with it."""
    try:
        cfg = config_mod.load(env, args.config)
    except ConfigError as exc:
        logs.configure("info", json=args.log_json)
        print(f"etl: {exc}", file=sys.stderr)
        return exc.exit_code
    logs.configure(args.log_level or cfg.log_level, json=args.log_json)
    if cfg.api_key:
        logs.register_secret(cfg.api_key.value)
    for password in config_mod.url_passwords(cfg):
        logs.register_secret(password)
    for warning in cfg.warnings:  # settings an older version read: loaded, ignored, said once
        log.warning("config_setting_ignored", config=cfg.source, warning=warning)
    return cfg


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line, or exit 2 with one line: `--json` only where a command prints a reading."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json and (
        args.command not in JSON_COMMANDS or getattr(args, "db_command", "current") not in READINGS
    ):
        name = " ".join(filter(None, (args.command, getattr(args, "db_command", None))))
        have = sorted({*JSON_COMMANDS - {"db"}, "db current", "db history"})
        parser.error(f"etl {name} has no --json output (these have: {', '.join(have)})")
    return args


def _fail(exc: Exception, user: str | None = None) -> int:
    """One line on stderr and the exit code for any error that reaches the top of a command."""
    code, line = _failure(exc, user)
    print(f"etl: {line}", file=sys.stderr)
    return code


def _failure(exc: Exception, user: str | None = None) -> tuple[int, str]:
    """The exit code and the one line (without "etl: ") for any error that reaches the top of a command.

    The project's own errors carry their message and code; a right the database user lacks is named with
    the fix (`etl db grants`, exit 78); an environmental failure (disk full, read-only, permission,
    memory) is named as such with exit 74, which systemd restarts; anything else is a bug: one line,
    exit 1, its traceback in the log at debug level."""
    if not isinstance(exc, EtlError):
        exc = denied(exc, user) or environmental(exc) or exc
    if isinstance(exc, EtlError):
        return exc.exit_code, str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    log.debug("unexpected_error", exc_info=exc)
    return 1, (
        f"unexpected error: {type(exc).__name__}: {first} (a bug: please report it; "
        "--log-level debug shows the traceback)"
    )


CREATES_DATABASE = {("db", "upgrade"), ("config", None)}  # `config` opens no database at all


def _refuse_missing_sqlite(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    """Only `etl db upgrade` makes a SQLite file: `etl status` on a mistyped path said "no schema yet"
    and left an empty file behind."""
    from etl.errors import SchemaOutOfDate
    from etl.store.engine import missing_sqlite_file

    if (args.command, getattr(args, "db_command", None)) in CREATES_DATABASE:
        return
    for what, url in (("database", cfg.database_url), ("warehouse", cfg.warehouse_url)):
        path = missing_sqlite_file(url)
        if path is not None:
            raise SchemaOutOfDate(
                f"the {what} {url}: the file {path} does not exist (nothing was created); check the URL "
                "(ETL_DATABASE_URL, [database] url), or make the database. Run: etl db upgrade"
            )


def _check_schema(parts: Parts) -> None:
    from etl.store import migrate

    migrate.check(parts.db.main, parts.db.warehouse)


def cmd_db(parts: Parts, args: argparse.Namespace) -> int:
    from etl.store import migrate

    if args.db_command in ("current", "history"):
        return _db_reading(parts, args)
    if args.db_command == "check":
        migrate.check(parts.db.main, parts.db.warehouse)
        print("schema is current")
        return 0
    if args.db_command == "grants":
        return _db_grants(parts, args)
    for role, before, after in migrate.upgrade(parts.db.main, parts.db.warehouse):
        what = {"both": "database (queue and warehouse)", "main": "queue database", "warehouse": "warehouse"}[
            role
        ]
        print(f"{what}: {before or 'empty'} -> {after}")
    return 0


def _db_grants(parts: Parts, args: argparse.Namespace) -> int:
    from etl.store import grants, migrate
    from etl.store.dialect import capabilities, database_file

    roles = grants.Roles(producer=args.producer, reader=args.reader, daemon=args.daemon)
    if not (capabilities(parts.db.main).roles and capabilities(parts.db.warehouse).roles):
        for eng, _ in migrate.roles(parts.db.main, parts.db.warehouse):
            path = database_file(eng)
            if path is not None:
                mode = f"{path.stat().st_mode & 0o777:04o}" if path.exists() else "not made yet"
                print(f"{path}: {mode}")
        print(
            "etl: SQLite has no roles: whoever may read the file reads every document and answer, whoever may\n"
            "write it may do anything. It must be 0600, owned by the service user (0640 only if its group may\n"
            "read everything), in a folder 0700; etl makes a new file so. Roles need PostgreSQL (docs/deploy.md)",
            file=sys.stderr,
        )
        return 1 if args.apply else 0
    migrate.check(parts.db.main, parts.db.warehouse)
    for eng, db_role in migrate.roles(parts.db.main, parts.db.warehouse):
        with eng.begin() as conn:
            sql = grants.statements(conn, db_role, roles)
            if args.apply:
                grants.apply(conn, sql)
        where = eng.url.render_as_string(hide_password=True)
        if args.apply:
            print(
                f"{where}: {len(sql)} statement(s) applied for {roles.producer}, {roles.reader}, {roles.daemon}"
            )
        else:
            print(f"-- {where}\n" + "".join(f"{s};\n" for s in sql))
    return 0


def _db_reading(parts: Parts, args: argparse.Namespace) -> int:
    """`etl db current` and `etl db history`: read the version tables, change nothing (no database file is
    made: the CLI refuses a missing SQLite file for reading commands)."""
    from etl.store import migrate

    current = {
        role: migrate.current_revision(eng, role)
        for eng, role in migrate.roles(parts.db.main, parts.db.warehouse)
    }
    if args.db_command == "current":
        body: dict[str, Any] = {"needed": migrate.HEAD, "databases": current}
        lines = [f"{role}: {rev or 'no schema yet'}" for role, rev in current.items()]
        lines.append(
            f"this version of etl needs {migrate.HEAD}"
            + ("" if set(current.values()) == {migrate.HEAD} else "; run: etl db upgrade")
        )
    else:
        steps = migrate.history()
        body = {"needed": migrate.HEAD, "databases": current, "migrations": steps}
        lines = []
        for step in steps:
            here = [role for role, rev in current.items() if rev == step["revision"]]
            mark = f"  <- {', '.join(here)}" if here else ""
            lines.append(f"{step['revision']}  {step['description']}{mark}")
    print(json.dumps(body, indent=2) if args.json else "\n".join(lines))
    return 0


def cmd_enqueue(parts: Parts, args: argparse.Namespace) -> int:
    from etl.enqueue import enqueue_file
    from etl.errors import InputMissing

    if args.file != "-" and not Path(args.file).exists():
        raise InputMissing(f"input file {args.file} does not exist; nothing was enqueued")
    _check_schema(parts)
    n = enqueue_file(
        parts.config, parts.db, args.file, fmt=args.format, default_task=args.task, batch_rows=args.batch_rows
    )
    print(f"enqueued {n:,} document(s)")
    return 0


def cmd_estimate(parts: Parts, args: argparse.Namespace) -> int:
    from etl import estimate

    _check_schema(parts)
    now = parts.clock()
    older_than = None if args.older_than is None else now - args.older_than.resolve(now)
    selection = estimate.Selection(task=args.task, min_priority=args.min_priority, older_than=older_than)
    result = estimate.run(
        parts.config, parts.db, parts.api, parts.clock(), selection, count_tokens=args.count_tokens
    )
    print(json.dumps(result.to_json(), indent=2) if args.json else estimate.render(result))
    return 0


def cmd_submit(parts: Parts, args: argparse.Namespace) -> int:
    from etl import pipeline, submitter

    if args.dry_run:
        return cmd_estimate(parts, args)
    _check_schema(parts)
    out = pipeline.submit(parts.config, parts.db, parts.api, parts.me, parts.clock)
    print(
        f"submitted {out.documents} document(s) in {out.batches} batch(es); rejected {out.rejected}"
        + (f"; {out.waiting} wait for the nightly budget" if out.waiting else "")
        + (f"; {out.unknown} create(s) with unknown outcome left for reconciliation" if out.unknown else "")
        + (f"; stopped: {out.stopped}" if out.stopped else "")
        + (f" ({out.idle_reason})" if out.idle_reason else "")
    )
    if out.paused is not None:
        print(f"etl: {submitter.paused_message(out.paused)}", file=sys.stderr)
        return SubmissionPaused.exit_code
    if out.misconfigured is not None:
        args.failure = f"{out.misconfigured}; nothing was sent, the rows are back in the queue"
        print(f"etl: {args.failure}", file=sys.stderr)
        return ConfigError.exit_code
    if not out.stopped or out.interrupted:
        return 0
    args.failure = f"stopped: {out.stopped}"  # recorded for `etl status --check` (etl.failures)
    return 3


def cmd_collect(parts: Parts, args: argparse.Namespace) -> int:
    from etl import pipeline, report, submitter

    _check_schema(parts)
    out = pipeline.collect(parts.config, parts.db, parts.api, parts.me, parts.clock)
    print(
        f"checked {out.batches_checked} batch(es), collected {out.batches_collected}: {out.succeeded} succeeded, "
        f"{out.requeued} re-queued, {out.dead} dead, {out.archived} re-queued from archived batches"
    )
    for problem in out.problems:
        print(f"  problem: {problem}", file=sys.stderr)
    if out.paused is not None:
        print(f"etl: {submitter.paused_message(out.paused)}", file=sys.stderr)
    if not args.no_report:
        readable = sys.stdout.isatty()
        body = report.morning(parts.config, parts.db, parts.clock(), log_body=not readable)
        if readable:
            print()
            print(report.render(body))
    if out.paused is not None:
        return SubmissionPaused.exit_code
    if not out.problems:
        return 0
    return 3  # finished with problems: each batch that needs action says so itself (etl.failures)


def cmd_reconcile(parts: Parts, args: argparse.Namespace) -> int:
    from etl import reconciler

    _check_schema(parts)
    if args.release is not None:
        rows = reconciler.release_by_operator(parts.db, parts.clock(), args.release)
        print(f"released intent {args.release}: {rows} row(s) back in the queue")
        return 0
    if args.acknowledge is not None:
        reconciler.acknowledge(parts.db, args.acknowledge)
        print(f"acknowledged unexplained batch {args.acknowledge}")
        return 0
    from etl import life, recovery

    me = life.hold(parts.db.main, parts.me)
    recovery.sweep(parts.db, me.owner, parts.clock())  # the dead-owner rules, as every command applies them
    out = reconciler.run(parts.config, parts.db, parts.api, parts.clock)
    print(
        f"released {out.released_claims} expired claim(s); adopted {out.adopted}, released {out.released_unknown}, "
        f"still unknown {out.still_unknown}; {len(out.unmatched_remote)} remote batch(es) match no record"
    )
    if out.paused is not None:  # the API refused the list: the key, billing or a spend limit
        from etl import submitter

        print(f"etl: {submitter.paused_message(out.paused)}", file=sys.stderr)
        return SubmissionPaused.exit_code
    return 0


def cmd_status(parts: Parts, args: argparse.Namespace) -> int:
    from etl.status import status

    _check_schema(parts)
    info, healthy, problems = status(parts.config, parts.db, parts.me.owner, parts.clock())
    if args.json:
        print(json.dumps({**info, "healthy": healthy, "problems": problems}, default=str, indent=2))
    else:
        from etl.status import render

        print(render(info, problems))
    if args.check and not healthy:
        return 1
    return 0


def cmd_report(parts: Parts, args: argparse.Namespace) -> int:
    from etl import report
    from etl.store import events

    _check_schema(parts)
    if args.since is not None:
        now = parts.clock()
        body = report.build(parts.config, parts.db, now, args.since.resolve(now))
    elif args.now:
        body = report.build(parts.config, parts.db, parts.clock(), None)
    else:
        with parts.db.main.connect() as conn:
            last = events.last_report(conn)
        if last is None:
            print("no morning report yet: run `etl collect` (or wait for the morning job)", file=sys.stderr)
            return 1
        body = last[1]
    print(json.dumps(body, indent=2, default=str) if args.json else report.render(body))
    return 0


def cmd_resume(parts: Parts, args: argparse.Namespace) -> int:
    from etl.store import state

    _check_schema(parts)
    with parts.db.main.begin() as conn:
        reason = state.resume(conn)
    print(f"submission resumed (was paused: {reason})" if reason else "submission was not paused")
    return 0


def cmd_pause(parts: Parts, args: argparse.Namespace) -> int:
    from etl.store import state

    _check_schema(parts)
    with parts.db.main.begin() as conn:
        before = state.pause_reason(conn)
        state.pause(conn, args.reason, parts.clock())
    print(f"submission was already paused: {before}" if before else f"submission paused: {args.reason}")
    return 0


def cmd_config(parts: Parts, args: argparse.Namespace) -> int:
    from etl import config_view

    print(config_view.render(parts.config), end="")
    return 0


def cmd_retry(parts: Parts, args: argparse.Namespace) -> int:
    from etl import retry
    from etl.errors import InputError

    now = parts.clock()
    statuses = ("dead",) if args.dead else ("rejected",) if args.rejected else ("dead", "rejected")
    sel = retry.Selection(
        statuses=statuses,
        doc_keys=tuple(args.doc_keys),
        task=args.task,
        reason=args.reason,
        since=args.since.resolve(now) if args.since else None,
        until=args.until.resolve(now) if args.until else None,
    )
    if not sel.narrowed and not args.all:
        raise InputError(
            "say which documents: DOC_KEY..., --task, --reason, --since or --until (or --all for every "
            "dead and rejected row); nothing was retried"
        )
    _check_schema(parts)
    out = retry.run(parts.config, parts.db, parts.clock(), sel, dry_run=args.dry_run)
    for task, n in out.unconfigured.items():
        print(
            f"etl: warning: {n:,} of these row(s) name task {task!r}, which is not configured: the next submit "
            f"rejects them again; add [tasks.{task}] to the config first",
            file=sys.stderr,
        )
    if args.json:
        body = {"dry_run": args.dry_run, "matched": out.matched, "retried": out.retried, "sample": out.sample}
        print(json.dumps({**body, "unconfigured_tasks": out.unconfigured}, indent=2))
        return 0
    for row in out.sample:
        print(f"  {row['status']:<8} {row['doc_key']} ({row['task']}, id {row['queue_id']}): {row['reason']}")
    if out.matched > len(out.sample):
        print(f"  ... and {out.matched - len(out.sample):,} more")
    if args.dry_run:
        print(f"would retry {out.matched:,} document(s) (dry run: nothing changed)")
    else:
        print(f"retried {out.retried:,} document(s): queued for the next submit")
    return 0


def cmd_cancel(parts: Parts, args: argparse.Namespace) -> int:
    from etl import cancel, pipeline
    from etl.errors import InputError

    if bool(args.batch_ids) == bool(args.all_pending):
        raise InputError("name the batches to cancel (BATCH_ID...) or pass --all-pending, not both")
    _check_schema(parts)
    if args.json and not args.dry_run:
        raise InputError(
            "etl cancel prints JSON only with --dry-run (a cancel is an action); nothing was canceled"
        )
    if args.dry_run:
        chosen = cancel.targets(parts.db, list(args.batch_ids), args.all_pending)
        if args.json:
            print(
                json.dumps([{"batch_id": i.batch_id, "requests": i.request_count} for i in chosen], indent=2)
            )
            return 0
        for intent in chosen:
            print(f"  {intent.batch_id}  {intent.request_count:,} request(s)")
        print(f"would cancel {len(chosen)} batch(es) (dry run: nothing was asked of the API)")
        return 0
    out = cancel.run(parts.db, parts.api, list(args.batch_ids), all_pending=args.all_pending)
    for problem in out.problems:
        print(f"  problem: {problem}", file=sys.stderr)
    if not out.canceled:
        print("canceled no batch" + ("" if out.problems else " (none pending)"))
        return 3 if out.problems else 0
    print(f"canceled {len(out.canceled)} batch(es): {', '.join(out.canceled)}")
    if out.ended:
        done = pipeline.collect(parts.config, parts.db, parts.api, parts.me, parts.clock)
        print(
            f"settled now: {done.succeeded} succeeded, {done.requeued} re-queued "
            f"(canceled requests go back to the queue without using an attempt), {done.dead} dead"
        )
    waiting = [b for b in out.canceled if b not in out.ended]
    if waiting:
        print(
            f"still canceling: {', '.join(waiting)}; the next `etl collect` (or the daemon) settles their rows"
        )
    return 3 if out.problems else 0


def cmd_metrics(parts: Parts, args: argparse.Namespace) -> int:
    from etl import metrics

    _check_schema(parts)
    sys.stdout.write(metrics.page(parts.config, parts.db, parts.me.owner, parts.clock))
    return 0


def cmd_run(parts: Parts, args: argparse.Namespace) -> int:
    from etl.daemon import run_daemon

    return run_daemon(parts.config, parts.db, parts.api, parts.me, parts.clock)


def cmd_live(parts: Parts, args: argparse.Namespace) -> int:
    from etl import live

    _check_schema(parts)
    parts.config.require_api_key()
    out = live.run_command(parts.config, parts.db, parts.api, parts.clock, once=args.once)
    print(
        f"live: {out.succeeded} done, {out.dead} dead, {out.rejected} rejected, {out.fell_back} fell back to "
        f"the batch, {out.recovered} recovered after a crash ({out.possibly_billed_twice} possibly billed twice)"
    )
    return 0


READINGS = frozenset({"current", "history"})  # the `etl db` actions that print a reading
JSON_COMMANDS = frozenset({"status", "report", "estimate", "submit", "db", "retry", "cancel"})
COMMANDS: dict[str, Callable[[Parts, argparse.Namespace], int]] = {
    "db": cmd_db,
    "enqueue": cmd_enqueue,
    "submit": cmd_submit,
    "estimate": cmd_estimate,
    "collect": cmd_collect,
    "reconcile": cmd_reconcile,
    "status": cmd_status,
    "report": cmd_report,
    "resume": cmd_resume,
    "pause": cmd_pause,
    "config": cmd_config,
    "retry": cmd_retry,
    "cancel": cmd_cancel,
    "metrics": cmd_metrics,
    "run": cmd_run,
    "live": cmd_live,
}


if __name__ == "__main__":
    raise SystemExit(main())
