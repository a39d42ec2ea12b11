"""The `etl` command. Errors are one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from etl import config as config_mod
from etl import failpoints, logs
from etl.errors import ConfigError, EtlError
from etl.runtime import Runtime, build

log = structlog.get_logger("etl.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etl",
        description="Run a company's document LLM processing through Anthropic's Message Batches API.",
    )
    p.add_argument(
        "--config", type=Path, help="config file (default: $ETL_CONFIG, ./config/etl.toml, /etc/etl/etl.toml)"
    )
    p.add_argument("--log-level", choices=sorted(logs.LEVELS), help="override logging.level")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="create or migrate the schema (queue database and warehouse)")
    db_sub.add_parser("check", help="exit non-zero unless the schema is current")

    enq = sub.add_parser("enqueue", help="add documents from a JSONL or CSV file ('-' for stdin)")
    enq.add_argument("file", help="path, or - for standard input")
    enq.add_argument("--format", choices=["jsonl", "csv"], help="default: from the file name, else jsonl")
    enq.add_argument("--task", help="task for rows that name none (default: 'default')")
    enq.add_argument("--batch-rows", type=int, default=5000, help=argparse.SUPPRESS)

    sub.add_parser("submit", help="the nightly job, now: reconcile, claim queued rows, send batches")
    col = sub.add_parser("collect", help="the morning job, now: collect ended batches, then the report")
    col.add_argument("--no-report", action="store_true", help="do not produce the morning report")
    rec = sub.add_parser("reconcile", help="settle batch creates whose outcome is unknown")
    rec.add_argument(
        "--release",
        type=int,
        metavar="INTENT",
        help="put the rows of this unknown intent (see etl status) back in the queue now, on your word that "
        "the API holds no batch of them. RISK: if that batch does exist, its rows are sent and billed twice",
    )
    st = sub.add_parser("status", help="queue counts, pending batches, deadlines, last runs")
    st.add_argument("--json", action="store_true")
    st.add_argument(
        "--check",
        action="store_true",
        help="health check: exit 1 if anything is stuck or late (README: the status --check truth table)",
    )
    rep = sub.add_parser("report", help="print the last morning report")
    rep.add_argument("--json", action="store_true")
    rep.add_argument(
        "--now", action="store_true", help="build a fresh report instead of printing the last one"
    )
    sub.add_parser(
        "resume", help="lift a submission pause after fixing its cause (spend limit, key, billing)"
    )
    sub.add_parser("config", help="print the effective configuration (secrets masked) after validating it")
    sub.add_parser("run", help="the daemon: scheduled submit and collect, polling, systemd notify")
    demo = sub.add_parser(
        "demo", help="the whole cycle in under a minute on a fresh SQLite file, no API key needed"
    )
    demo.add_argument("--dir", type=Path, help="where to put the demo database (default: a temporary folder)")
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    sub.add_parser(
        "emulator", help="run the local Batches API emulator (see: etl emulator --help)", add_help=False
    )
    return p


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
    rt = build(cfg)
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

    _check_schema(rt)
    n = enqueue_file(rt, args.file, fmt=args.format, default_task=args.task, batch_rows=args.batch_rows)
    print(f"enqueued {n} document(s)")
    return 0


def cmd_submit(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import submitter

    _check_schema(rt)
    out = submitter.run(rt)
    print(
        f"submitted {out.documents} document(s) in {out.batches} batch(es); rejected {out.rejected}"
        + (f"; {out.unknown} create(s) with unknown outcome left for reconciliation" if out.unknown else "")
        + (f"; stopped: {out.stopped}" if out.stopped else "")
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
        report.morning(rt)
    return 0 if not out.problems else 3


def cmd_reconcile(rt: Runtime, args: argparse.Namespace) -> int:
    from etl import reconciler

    _check_schema(rt)
    if args.release is not None:
        rows = reconciler.release_by_operator(rt, args.release)
        print(f"released intent {args.release}: {rows} row(s) back in the queue")
        return 0
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
    if args.now:
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
    cfg = rt.config
    print(f"config file: {cfg.source}")
    print(f"database: {rt.engine.url.render_as_string(hide_password=True)}")
    print(f"warehouse: {rt.warehouse.url.render_as_string(hide_password=True)}")
    print(f"api: {cfg.base_url or 'https://api.anthropic.com'}; key {'set' if cfg.api_key else 'MISSING'}")
    print(f"tasks: {', '.join(f'{t.name} ({t.model})' for t in cfg.tasks.values())}")
    print(
        f"schedule: submit '{cfg.schedule.submit_cron}', collect '{cfg.schedule.collect_cron}' "
        f"in {cfg.schedule.timezone}; poll every {cfg.schedule.poll_minutes} min"
    )
    return 0


def cmd_run(rt: Runtime, args: argparse.Namespace) -> int:
    from etl.daemon import run_daemon

    return run_daemon(rt)


COMMANDS: dict[str, Callable[[Runtime, argparse.Namespace], int]] = {
    "db": cmd_db,
    "enqueue": cmd_enqueue,
    "submit": cmd_submit,
    "collect": cmd_collect,
    "reconcile": cmd_reconcile,
    "status": cmd_status,
    "report": cmd_report,
    "resume": cmd_resume,
    "config": cmd_config,
    "run": cmd_run,
}


if __name__ == "__main__":
    raise SystemExit(main())
