"""The collector's own Python per result line, without HTTP or a database, against the baseline's.

100,000 synthetic result lines (the emulator's shape: one text block, usage without cache writes, ids of
one installation and intent) go through `collector._Pass.sort` and `settlement.Chunk.add` with the
warehouse encoder of each dialect, as `etl collect` runs them (garbage collection paused). The baseline is
what `bench/baseline_collect.py` does per line: `orjson.loads` and a tuple of the same columns.
Usage: .venv/bin/python bench/per_result.py [--lines N]
"""

from __future__ import annotations

import argparse
import gc
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from sqlalchemy.dialects import postgresql, sqlite

from etl import collector, settlement
from etl import config as config_mod
from etl.pricing import Meter
from etl.prompt import custom_id
from etl.remote import RemoteBatch
from etl.settlement import Expected
from etl.store.batches import Intent
from etl.store.warehouse import Encoder

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 12, 5, tzinfo=UTC)
INSTALLATION = "3d1219c7c4c5"


def lines(n: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "custom_id": custom_id(q, INSTALLATION, 7),
                "result": {
                    "type": "succeeded",
                    "message": {
                        "id": f"msg_{q:024d}",
                        "type": "message",
                        "role": "assistant",
                        "model": "claude-haiku-4-5-20251001",
                        "content": [{"type": "text", "text": "A summary of the document " * 12}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": 300 + q % 50,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                            "cache_creation": {
                                "ephemeral_5m_input_tokens": 0,
                                "ephemeral_1h_input_tokens": 0,
                            },
                            "output_tokens": 80 + q % 30,
                            "service_tier": "batch",
                        },
                    },
                },
            }
        )
        for q in range(1, n + 1)
    ]


def baseline(batch: list[bytes]) -> float:
    started = time.process_time()
    rows = []
    for line in batch:
        obj = orjson.loads(line)
        message = obj["result"]["message"]
        usage = message["usage"]
        text = "".join(b["text"] for b in message["content"] if b["type"] == "text")
        qid = int(obj["custom_id"][1:].split("_", 1)[0])
        rows.append((qid, text, message["model"], usage["input_tokens"], usage["output_tokens"]))
    return time.process_time() - started


def etl(batch: list[bytes], dialect: object) -> float:
    cfg = config_mod.load({}, ROOT / "config" / "etl.toml")
    n = len(batch)
    intent = Intent(7, "msgbatch_x", "submitted", n, NOW, NOW, NOW, NOW, None, None, "ended", None, False, None,
                    None, INSTALLATION)  # fmt: skip
    remote = RemoteBatch("msgbatch_x", "ended", {"succeeded": n}, NOW, None, NOW, None, None, None)
    expected = {q: Expected(f"doc-{q}", "default", 0, "submitted", NOW) for q in range(1, n + 1)}
    chunk = settlement.Chunk(intent, remote, cfg, Encoder(dialect), Meter(cfg.pricing), NOW, True)  # type: ignore[arg-type]
    read = collector._Pass(suffix=collector.own_suffix(intent))
    started = time.process_time()
    for line in batch:
        answer = read.sort(intent, expected, line)
        if answer is not None:
            chunk.add(*answer)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    batch = lines(args.lines)
    gc.disable()  # as etl.memory.gc_paused does around a batch
    base = min(baseline(batch) for _ in range(3))
    print(f"baseline: {1e6 * base / args.lines:.1f} us a line")
    for name, dialect in (("sqlite", sqlite.dialect()), ("postgresql", postgresql.psycopg.dialect())):  # type: ignore[attr-defined]
        spent = min(etl(batch, dialect) for _ in range(3))
        print(
            f"RESULT db={name} lines={args.lines} us_per_result={1e6 * spent / args.lines:.1f} ratio={spent / base:.2f}"
        )


if __name__ == "__main__":
    main()
