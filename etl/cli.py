"""The `etl` command. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from etl import __version__, failpoints, logs
from etl import config as config_mod
from etl.errors import ConfigError, EtlError
from etl.runtime import Runtime, build

log = structlog.get_logger("etl.cli")


EXIT_CODES = {
    0: "success",
    1: "failure (the message says what happened)",
    2: "wrong command-line usage",
    3: "the job finished but reported problems (listed on stderr)",
    65: "a bad input file or argument: nothing from it was stored",
    66: "the input file does not exist or cannot be read",
    75: "submission is paused until `etl resume`",
    78: "configuration problem: config file, schema out of date, database unreachable, no API key",
}
CONFIG_ENV = {
    "ETL_CONFIG": "path of the config file",
    "ETL_DATABASE_URL": "queue database URL (sqlite:///PATH, postgresql:// or postgres://)",
    "ETL_WAREHOUSE_URL": "warehouse URL (default: the queue database)",
    "ETL_TIMEZONE": "schedule time zone",
    "ETL_LOG_LEVEL": "log level (debug, info, warning, error)",
}
API_ENV = {
    "ANTHROPIC_API_KEY": "the API key",
    "CREDENTIALS_DIRECTORY": "systemd credentials folder holding anthropic_api_key",
    "ANTHROPIC_BASE_URL": "another API origin, e.g. the local emulator",
}


def _epilog(codes: Sequence[int], *, api: bool = False, config: bool = True, extra: str = "") -> str:
    env = {**(CONFIG_ENV if config else {}), **(API_ENV if api else {})}
    parts = [extra] if extra else []
    parts.append("exit codes:\n" + "\n".join(f"  {c:<3} {EXIT_CODES[c]}" for c in codes))
    if env:
        parts.append("environment:\n" + "\n".join(f"  {k:<22} {v}" for k, v in env.items()))
    return "\n\n".join(parts)


BASIC = (0, 1, 2, 78)
GLOBAL_OPTIONS = (
    "options of every command, given before it: --config FILE, --log-level LEVEL, --log-json (`etl --help`)"
)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="etl",
        description="Run a company's document LLM processing through Anthropic's Message Batches API.",
        epilog=_epilog(sorted(EXIT_CODES), api=True, extra="`etl COMMAND --help` describes each command."),
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"etl {__version__}")
    p.add_argument(
        "--config", type=Path, help="config file (default: $ETL_CONFIG, ./config/etl.toml, /etc/etl/etl.toml)"
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=list(logs.LEVELS),
        help="override logging.level: debug, info, warning or error",
    )
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, codes: Sequence[int] = BASIC, **kw: Any) -> argparse.ArgumentParser:
        details = kw.pop("details", "")
        return sub.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
            epilog=_epilog(codes, api=kw.pop("api", False), extra=GLOBAL_OPTIONS),
            formatter_class=fmt,
            **kw,
        )

    db = command("db", "database schema: create, migrate or check it")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser(
        "upgrade",
        help="create or migrate the schema (queue database and warehouse)",
        description="Create or migrate the schema of the queue database and the warehouse.",
        epilog=_epilog(BASIC),
        formatter_class=fmt,
    )
    db_sub.add_parser(
        "check",
        help="exit non-zero unless the schema is current",
        description="Exit 78 unless both databases are at the schema this version needs.",
        epilog=_epilog(BASIC),
        formatter_class=fmt,
    )

    enq = command(
        "enqueue",
        "add documents from a JSONL or CSV file ('-' for stdin)",
        (0, 1, 2, 65, 66, 78),
        details="A file goes in whole or not at all: a broken line, a row without doc_key and body, or a\n"
        "row naming a task that is not configured stops it with the line's number and nothing is kept,\n"
        "so the fixed file can simply be enqueued again. Keys other than doc_key, body, task, priority\n"
        "and metadata become metadata.",
    )
    enq.add_argument("file", help="path, or - for standard input")
    enq.add_argument("--format", choices=["jsonl", "csv"], help="default: from the file name, else jsonl")
    enq.add_argument("--task", help="task for rows that name none (default: 'default'); must be configured")
    enq.add_argument("--batch-rows", type=int, default=5000, help=argparse.SUPPRESS)

    sm = command(
        "submit",
        "the nightly job, now: reconcile, claim queued rows, send batches",
        (0, 1, 2, 3, 75, 78),
        api=True,
        details="The API key, the pause and the schema are checked before a row is claimed; rows that\n"
        "could not be sent go back to the queue at once. When nothing is sent it says why.",
    )
    sm.add_argument(
        "--dry-run", action="store_true", help="print what it would cost (as `etl estimate`); send nothing"
    )
    sm.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    _estimate_arguments(sm, suppress=True)
    est = command(
        "estimate",
        "what the queue would cost, per task and model; nothing is claimed or sent",
        details="Input tokens are estimated locally (4 characters a token) or, with --count-tokens, from a\n"
        "sample counted by the API's free count_tokens; output at max_tokens (an upper bound). The\n"
        "nightly cap, what is reserved tonight and how many documents fit under it are shown too.",
    )
    _estimate_arguments(est)
    col = command(
        "collect",
        "the morning job, now: collect ended batches, then the report",
        (0, 1, 2, 3, 75, 78),
        api=True,
        details="On a terminal the morning report is printed readable (as `etl report` does); off a\n"
        "terminal it is one JSON log line.",
    )
    col.add_argument("--no-report", action="store_true", help="do not produce the morning report")
    rec = command(
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
    st = command(
        "status",
        "queue counts, pending batches, deadlines, last runs",
        details="With --check: exit 1 whenever anything is stuck or late, each cause on its own line\n"
        "(README: the status --check truth table); 78 when the schema is behind or incomplete.",
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--check",
        action="store_true",
        help="health check: exit 1 if anything is stuck or late (README: the status --check truth table)",
    )
    rep = command("report", "print the last morning report")
    rep.add_argument("--json", action="store_true", help="the report as JSON")
    rep.add_argument(
        "--now", action="store_true", help="build a fresh report instead of printing the last one"
    )
    rep.add_argument(
        "--since", type=_duration, help="a fresh report over this period, e.g. 30d, 12h (implies --now)"
    )
    command("resume", "lift a submission pause after fixing its cause (spend limit, key, billing)")
    ret = command(
        "retry",
        "send dead and rejected documents again",
        (0, 1, 2, 65, 78),
        details="Selected rows go back to `queued` with their attempts reset; their old reason is kept after\n"
        "'retried; was dead:'. Every given selector must match. Without any selector, --all is needed.\n"
        "Times: an ISO date/time (UTC unless it says otherwise) or a duration ago (90m, 24h, 7d).",
    )
    ret.add_argument("doc_keys", nargs="*", metavar="DOC_KEY", help="only these documents")
    ret.add_argument("--task", help="only rows of this task")
    ret.add_argument("--reason", metavar="TEXT", help="only rows whose reason contains TEXT (any case)")
    ret.add_argument("--since", metavar="TIME", help="only rows that failed at or after TIME")
    ret.add_argument("--until", metavar="TIME", help="only rows that failed before TIME")
    which = ret.add_mutually_exclusive_group()
    which.add_argument("--dead", action="store_true", help="only dead rows")
    which.add_argument("--rejected", action="store_true", help="only rejected rows")
    ret.add_argument("--all", action="store_true", help="retry every dead and rejected row")
    ret.add_argument("--dry-run", action="store_true", help="show what would be retried, change nothing")
    can = command(
        "cancel",
        "cancel pending batches at the API",
        (0, 1, 2, 3, 65, 78),
        api=True,
        details="Requests the model has not processed yet are canceled (not billed) and go back to the queue\n"
        "without using an attempt; requests already processed are collected as usual. When the batch\n"
        "has ended by the time the API answers, its rows are settled at once; otherwise by the next\n"
        "collect (the daemon polls).",
    )
    can.add_argument("batch_ids", nargs="*", metavar="BATCH_ID", help="batch ids from `etl status`")
    can.add_argument("--all-pending", action="store_true", help="cancel every pending batch")
    command(
        "config",
        "print the whole effective configuration as TOML, secrets masked",
        details="The output is a valid config file: the file's settings, the defaults and the environment\n"
        "overrides, after validation.",
    )
    command(
        "run", "the daemon: scheduled submit and collect, polling, systemd notify", (0, 1, 2, 78), api=True
    )
    live = command(
        "live",
        "the live path alone: urgent rows through the Messages API now",
        (0, 1, 2, 78),
        api=True,
        details="Urgent rows are those with mode = 'live' or a due_by the next batch cannot meet (README,\n"
        '"Urgent documents"). `etl run` runs the same worker; this is for cron or a second worker.',
    )
    live.add_argument("--once", action="store_true", help="process the urgent rows waiting now, then exit")
    demo = command(
        "demo",
        "the whole cycle in under a minute on a fresh SQLite file, no API key needed",
        (0, 1, 2),
    )
    demo.add_argument("--dir", type=Path, help="where to put the demo database (default: a temporary folder)")
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    sub.add_parser(
        "emulator", help="run the local Batches API emulator (see: etl emulator --help)", add_help=False
    )
    return p


def _duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`: a period back from now."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    number, unit = text[:-1], text[-1:].lower()
    if unit not in units or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a period like 30d, 12h or 90m")
    return timedelta(**{units[unit]: int(number)})


def _estimate_arguments(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    def helped(text: str) -> str:
        return argparse.SUPPRESS if suppress else text

    p.add_argument("--task", help=helped("only this task's documents"))
    p.add_argument("--min-priority", type=int, help=helped("only documents of at least this priority"))
    p.add_argument(
        "--older-than", type=_duration, help=helped("only documents queued this long ago, e.g. 2d")
    )
    p.add_argument(
        "--count-tokens",
        action="store_true",
        help=helped(
            "count input tokens of a sample with the API's free count_tokens (submit.count_tokens_sample)"
        ),
    )
    if not suppress:
        p.add_argument(
            "--json", action="store_true", help="machine-readable output (money as decimal strings)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """The `etl` command. Without `argv` it is the process's own command (the console script, `python -m
    etl.cli`), and the process exits once it returns."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        if argv is None:
            # Interpreter teardown runs the cyclic collector over every object still alive, most of them
            # the SDK's (2,900 modules): 0.3 s of every command, however little it did. Frozen objects
            # are skipped; they are freed all the same when the process exits.
            gc.freeze()


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "emulator":
        from etl.emulator.cli import main as emulator_main

        return emulator_main(argv[1:])
    args = _parser().parse_args(argv)
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
    try:
        cfg = config_mod.load(env, args.config)
    except ConfigError as exc:
        logs.configure("info", json=args.log_json)
        print(f"etl: {exc}", file=sys.stderr)
        return exc.exit_code
    logs.configure(args.log_level or cfg.log_level, json=args.log_json)
    if cfg.api_key:
        logs.register_secret(cfg.api_key.value)
    handler = COMMANDS[args.command]
    try:
        rt = build(cfg)
    except EtlError as exc:
        print(f"etl: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        return handler(rt, args)
    except EtlError as exc:
        print(f"etl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        rt.close()


def _check_schema(rt: Runtime) -> None:
    from etl.store import migrate

    migrate.check(rt.engine, rt.warehouse)


def cmd_db(rt: Runtime, args: argparse.Namespace) -> int:
    from etl.store import migrate

    if args.db_command == "check":
        migrate.check(rt.engine, rt.warehouse)
        print("schema is current")
        return 0
    for role, before, after in migrate.upgrade(rt.engine, rt.warehouse):
        what = {"both": "database (queue and warehouse)", "main": "queue database", "warehouse": "warehouse"}[
            role
        ]
        print(f"{what}: {before or 'empty'} -> {after}")
    return 0


def cmd_enqueue(rt: Runtime, args: argparse.Namespace) -> int:
    from etl.enqueue import enqueue_file
    from etl.errors import InputMissing

    if args.file != "-" and not Path(args.file).exists():
        raise InputMissing(f"input file {args.file} does not exist; nothing was enqueued")
    _check_schema(rt)
    n = enqueue_file(rt, args.file, fmt=args.format, default_task=args.task, batch_rows=args.batch_rows)
    print(f"enqueued {n:,} document(s)")
    return 0


def cmd_estimate(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import estimate

    _check_schema(rt)
    selection = estimate.Selection(task=args.task, min_priority=args.min_priority, older_than=args.older_than)
    result = estimate.run(rt, selection, count_tokens=args.count_tokens)
    print(json.dumps(result.to_json(), indent=2) if args.json else estimate.render(result))
    return 0


def cmd_submit(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import submitter

    if args.dry_run:
        return cmd_estimate(rt, args)
    _check_schema(rt)
    out = submitter.run(rt)
    print(
        f"submitted {out.documents} document(s) in {out.batches} batch(es); rejected {out.rejected}"
        + (f"; {out.waiting} wait for the nightly budget" if out.waiting else "")
        + (f"; {out.unknown} create(s) with unknown outcome left for reconciliation" if out.unknown else "")
        + (f"; stopped: {out.stopped}" if out.stopped else "")
        + (f" ({out.idle_reason})" if out.idle_reason else "")
    )
    return 0 if not out.stopped or out.stopped in ("stop requested",) else 3


def cmd_collect(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import collector, report

    _check_schema(rt)
    out = collector.run(rt)
    print(
        f"checked {out.batches_checked} batch(es), collected {out.batches_collected}: {out.succeeded} succeeded, "
        f"{out.requeued} re-queued, {out.dead} dead, {out.archived} re-queued from archived batches"
    )
    for problem in out.problems:
        print(f"  problem: {problem}", file=sys.stderr)
    if not args.no_report:
        readable = sys.stdout.isatty()
        body = report.morning(rt, log_body=not readable)
        if readable:
            print()
            print(report.render(body))
    return 0 if not out.problems else 3


def cmd_reconcile(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import reconciler

    _check_schema(rt)
    if args.release is not None:
        rows = reconciler.release_by_operator(rt, args.release)
        print(f"released intent {args.release}: {rows} row(s) back in the queue")
        return 0
    if args.acknowledge is not None:
        reconciler.acknowledge(rt, args.acknowledge)
        print(f"acknowledged unexplained batch {args.acknowledge}")
        return 0
    from etl import life, recovery

    life.hold(rt)
    recovery.sweep(rt)  # the dead-owner rules, as every command applies them
    out = reconciler.run(rt)
    print(
        f"released {out.released_claims} expired claim(s); adopted {out.adopted}, released {out.released_unknown}, "
        f"still unknown {out.still_unknown}; {len(out.unmatched_remote)} remote batch(es) match no record"
    )
    return 0


def cmd_status(rt: Runtime, args: argparse.Namespace) -> int:
    from etl.status import status

    _check_schema(rt)
    info, healthy, problems = status(rt)
    if args.json:
        print(json.dumps({**info, "healthy": healthy, "problems": problems}, default=str, indent=2))
    else:
        from etl.status import render

        print(render(info, problems))
    if args.check and not healthy:
        return 1
    return 0


def cmd_report(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import report
    from etl.store import events

    _check_schema(rt)
    if args.since is not None:
        now = rt.clock()
        body = report.build(rt, now, now - args.since)
    elif args.now:
        body = report.build(rt, rt.clock(), None)
    else:
        with rt.engine.connect() as conn:
            last = events.last_report(conn)
        if last is None:
            print("no morning report yet: run `etl collect` (or wait for the morning job)", file=sys.stderr)
            return 1
        body = last[1]
    print(json.dumps(body, indent=2, default=str) if args.json else report.render(body))
    return 0


def cmd_resume(rt: Runtime, args: argparse.Namespace) -> int:
    from etl.store import state

    _check_schema(rt)
    with rt.engine.begin() as conn:
        reason = state.resume(conn)
    print(f"submission resumed (was paused: {reason})" if reason else "submission was not paused")
    return 0


def cmd_config(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import config_view

    print(config_view.render(rt.config), end="")
    return 0


def cmd_retry(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import retry
    from etl.errors import InputError

    now = rt.clock()
    statuses = ("dead",) if args.dead else ("rejected",) if args.rejected else ("dead", "rejected")
    sel = retry.Selection(
        statuses=statuses,
        doc_keys=tuple(args.doc_keys),
        task=args.task,
        reason=args.reason,
        since=retry.parse_time(args.since, now, "--since") if args.since else None,
        until=retry.parse_time(args.until, now, "--until") if args.until else None,
    )
    if not sel.narrowed and not args.all:
        raise InputError(
            "say which documents: DOC_KEY..., --task, --reason, --since or --until (or --all for every "
            "dead and rejected row); nothing was retried"
        )
    _check_schema(rt)
    out = retry.run(rt, sel, dry_run=args.dry_run)
    for row in out.sample:
        print(f"  {row['status']:<8} {row['doc_key']} ({row['task']}, id {row['queue_id']}): {row['reason']}")
    if out.matched > len(out.sample):
        print(f"  ... and {out.matched - len(out.sample):,} more")
    if args.dry_run:
        print(f"would retry {out.matched:,} document(s) (dry run: nothing changed)")
    else:
        print(f"retried {out.retried:,} document(s): queued for the next submit")
    return 0


def cmd_cancel(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import cancel, collector
    from etl.errors import InputError

    if bool(args.batch_ids) == bool(args.all_pending):
        raise InputError("name the batches to cancel (BATCH_ID...) or pass --all-pending, not both")
    _check_schema(rt)
    out = cancel.run(rt, list(args.batch_ids), all_pending=args.all_pending)
    for problem in out.problems:
        print(f"  problem: {problem}", file=sys.stderr)
    if not out.canceled:
        print("canceled no batch" + ("" if out.problems else " (none pending)"))
        return 3 if out.problems else 0
    print(f"canceled {len(out.canceled)} batch(es): {', '.join(out.canceled)}")
    if out.ended:
        done = collector.run(rt)
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


def cmd_run(rt: Runtime, args: argparse.Namespace) -> int:
    from etl.daemon import run_daemon

    return run_daemon(rt)


def cmd_live(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import live

    _check_schema(rt)
    rt.config.require_api_key()
    out = live.run_command(rt, once=args.once)
    print(
        f"live: {out.succeeded} done, {out.dead} dead, {out.rejected} rejected, {out.fell_back} fell back to "
        f"the batch, {out.recovered} recovered after a crash ({out.possibly_billed_twice} possibly billed twice)"
    )
    return 0


COMMANDS: dict[str, Callable[[Runtime, argparse.Namespace], int]] = {
    "db": cmd_db,
    "enqueue": cmd_enqueue,
    "submit": cmd_submit,
    "estimate": cmd_estimate,
    "collect": cmd_collect,
    "reconcile": cmd_reconcile,
    "status": cmd_status,
    "report": cmd_report,
    "resume": cmd_resume,
    "config": cmd_config,
    "retry": cmd_retry,
    "cancel": cmd_cancel,
    "run": cmd_run,
    "live": cmd_live,
}


if __name__ == "__main__":
    raise SystemExit(main())
