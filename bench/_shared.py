"""What the benchmark scripts share: the task settings read from the config, and the request encoding.

The baselines import only this module and the standard library (plus psycopg and orjson), never `etl`, so
their start-up cost is an interpreter and a driver, nothing more.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "config" / "etl.toml"
API_VERSION = "2026-10-21"  # what the SDK sends (anthropic._constants); the emulator checks params by it


def load_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def task_params(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the fixed part of its params, in the key order `etl.prompt.build_params` uses."""
    out: dict[str, dict[str, Any]] = {}
    for name, task in cfg.get("tasks", {}).items():
        fixed: dict[str, Any] = {"model": task["model"], "max_tokens": task["max_tokens"]}
        system: list[dict[str, Any]] | None = None
        if task.get("system"):
            block: dict[str, Any] = {"type": "text", "text": task["system"]}
            if task.get("cache_system"):
                block["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
            system = [block]
        schema = task.get("output_schema")
        out[name] = {
            "fixed": fixed,
            "template": task["template"],
            "system": system,
            "output_config": {"format": {"type": "json_schema", "schema": schema}} if schema else None,
        }
    return out


def encode(qid: int, doc_key: str, task_name: str, body: str, metadata: Any, tasks: dict[str, Any]) -> bytes:
    """The same bytes `etl.prompt.encode_request(build_params(row))` produces (orjson, as etl), without the
    validation."""
    task = tasks[task_name]
    values: dict[str, Any] = {"body": body, "doc_key": doc_key, "task": task_name}
    if metadata:
        meta = json.loads(metadata) if isinstance(metadata, str) else metadata
        values.update(meta)
    params: dict[str, Any] = dict(task["fixed"])
    params["messages"] = [{"role": "user", "content": task["template"].format_map(values)}]
    if task["system"] is not None:
        params["system"] = task["system"]
    if task["output_config"] is not None:
        params["output_config"] = task["output_config"]
    # custom_ids of etl's shape (row, intent, installation: etl.prompt.custom_id), so both bodies weigh alike
    return orjson.dumps({"custom_id": f"q{qid}{CUSTOM_ID_TAIL}", "params": params})


CUSTOM_ID_TAIL = "_1_0123456789ab"  # etl's `_<intent>_<installation>` after the row id


def price_table(cfg: dict[str, Any]) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    pricing = cfg.get("pricing", {})
    models = {name: (p["input"], p["output"]) for name, p in pricing.get("models", {}).items()}
    rates = {
        "batch_discount": pricing.get("batch_discount", 0.5),
        "cache_write_5m": pricing.get("cache_write_5m", 1.25),
        "cache_write_1h": pricing.get("cache_write_1h", 2.0),
        "cache_read": pricing.get("cache_read", 0.1),
    }
    return models, rates
