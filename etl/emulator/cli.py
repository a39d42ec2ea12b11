"""``etl emulator``: run the Message Batches API emulator in the foreground."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from etl.emulator.faults import FaultConfigError
from etl.emulator.server import DEFAULT_MAX_REQUEST_BYTES, EmulatorConfig, EmulatorServer


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The emulator's argument parser (pass one, e.g. a subparser, to fill it in)."""
    parser = parser or argparse.ArgumentParser(
        prog="etl emulator",
        description="Run a local emulator of Anthropic's Message Batches API (see docs/emulator.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8765, help="port to listen on; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--processing-seconds",
        type=float,
        default=3.0,
        help="virtual seconds a batch takes to end; 0 ends it at once (default: %(default)s)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="bodies larger than this get 413 request_too_large (default: 256 MB)",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="persist state to this JSON file (written atomically after each change, loaded at start)",
    )
    parser.add_argument(
        "--faults",
        default=None,
        metavar="FILE_OR_JSON",
        help="fault document: a path to a JSON file, or inline JSON such as '{\"rules\": [...]}'",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for result order and rate-based faults")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require exactly this API key (default: any non-empty key is accepted)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="log level, the same words as `etl --log-level`; debug logs every request (default: %(default)s)",
    )
    return parser


def load_faults(value: str | None) -> dict[str, Any] | None:
    """Parse ``--faults``: inline JSON when it starts with ``{``, else a file path."""
    if value is None:
        return None
    text = value if value.lstrip().startswith("{") else Path(value).read_text()
    document = json.loads(text)
    if not isinstance(document, dict):
        raise FaultConfigError("the fault document must be a JSON object")
    return document


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        processing_seconds=args.processing_seconds,
        max_request_bytes=args.max_request_bytes,
        state_file=args.state_file,
        seed=args.seed,
        faults=load_faults(args.faults),
        require_key=args.api_key,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until SIGINT or SIGTERM; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        emulator = EmulatorServer(config_from_args(args))
        emulator.bind()
    except (OSError, ValueError) as exc:
        print(f"etl emulator: cannot start: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=emulator.stop, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"etl emulator listening on {emulator.base_url} (any API key works unless --api-key is given)")
    print(f"export ANTHROPIC_BASE_URL={emulator.base_url}", flush=True)
    try:
        emulator.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
