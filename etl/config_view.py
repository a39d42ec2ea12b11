"""`etl config`: the whole effective configuration as TOML, ready to copy into a config file.

Derived from the configuration's dataclasses, not listed by hand: a setting added to one of them appears
here by itself. A top-level field of `Config` says where it goes with `metadata={"toml": "section.key"}`
(or `"skip"`); a field holding a dataclass becomes the table of its own name. Secrets never appear: the
API key is reported as set or missing, in a comment, and a database password is masked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from etl.config import Config, mask_url

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def as_tables(cfg: Config) -> dict[str, Any]:
    """The configuration as the nested tables of a config file (the layout `config.load` reads)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        where = f.metadata.get("toml")
        value = getattr(cfg, f.name)
        if where == "skip" or value is None:
            continue
        if where is None:
            out[f.name] = _plain(value)
            continue
        *path, key = str(where).split(".")
        table = out
        for part in path:
            table = table.setdefault(part, {})
        table[key] = _plain(value)
    if not cfg.separate_warehouse:
        out.get("database", {}).pop("warehouse_url", None)
    for table in (out.get("database") or {},):
        for key in ("url", "warehouse_url"):
            if key in table:
                table[key] = mask_url(table[key])
    return out


def _plain(value: Any) -> Any:
    """Dataclasses and mappings as dicts (fields marked `derived` left out), `None` values dropped."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("derived") and getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render(cfg: Config) -> str:
    head = [
        "# The effective configuration of etl: the config file, the defaults and the environment overrides.",
        f"# config file: {cfg.source}",
        f"# API key: {'set' if cfg.api_key else 'MISSING'} (never shown; read from "
        f"{' or '.join(cfg.api_key_sources)})",
        "",
    ]
    return "\n".join(head) + dumps(as_tables(cfg))


def dumps(tables: Mapping[str, Any]) -> str:
    """A small TOML writer for what a configuration holds: strings, numbers, booleans, lists, tables."""
    lines: list[str] = []
    _table(lines, [], tables)
    return "\n".join(lines).strip() + "\n"


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes, plus DEL, which TOML (unlike JSON) does not allow raw."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    subtables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (scalars or not subtables):
        lines += ["", f"[{'.'.join(_key(p) for p in path)}]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
    for name, sub in subtables.items():
        _table(lines, [*path, name], sub)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Decimal):  # money and prices: the number as written, never through a float
        text = format(value, "f")
        return text if value == value.to_integral_value() or "." in text else text + ".0"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
