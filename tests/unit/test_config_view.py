"""`etl config` prints a config file that loads back to the same configuration."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from etl import config
from etl.config_view import as_tables, dumps, render
from tests.conftest import ROOT

ENV = {
    "ETL_DATABASE_URL": "sqlite:////tmp/etl-config-view.db",
    "ANTHROPIC_API_KEY": "sk-ant-api03-secretsecret",
}


def _same(a: config.Config, b: config.Config) -> None:
    assert dataclasses.replace(a, source="x") == dataclasses.replace(b, source="x")


def test_the_shipped_config_prints_as_toml_that_loads_back_the_same(tmp_path: Path) -> None:
    cfg = config.load(ENV, ROOT / "config" / "etl.toml")
    text = render(cfg)
    assert "sk-ant-api03" not in text and "API key: set" in text
    out = tmp_path / "etl.toml"
    out.write_text(text, encoding="utf-8")
    _same(config.load(ENV, out), cfg)


def test_every_settings_field_appears_without_being_listed_by_hand() -> None:
    tables = as_tables(config.load(ENV, ROOT / "config" / "etl.toml"))
    for name in ("submit", "collect", "schedule"):
        cls = type(getattr(config.load(ENV, ROOT / "config" / "etl.toml"), name))
        assert set(tables[name]) == {f.name for f in dataclasses.fields(cls)}
    assert set(tables) >= {"database", "api", "logging", "tasks", "pricing", "submit", "collect", "schedule"}
    assert "template_fields" not in tables["tasks"]["classify"] and "name" not in tables["tasks"]["default"]


def test_a_database_password_is_masked() -> None:
    env = {**ENV, "ETL_DATABASE_URL": "postgresql://etl:hunter2@db:5432/etl"}
    text = render(config.load(env, ROOT / "config" / "etl.toml"))
    assert "hunter2" not in text and 'url = "postgresql://etl:***@db:5432/etl"' in text


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    max_attempts=st.integers(1, 50),
    chunk=st.integers(1, 10**6),
    poll=st.floats(0.5, 1000, allow_nan=False),
    system=_text,
    template=_text.map(lambda t: t + "{body}"),
    tokens=st.integers(1, 64000),
    cache=st.booleans(),
    task_name=st.from_regex(r"[a-z][a-z0-9_ .-]{0,15}", fullmatch=True),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
)
def test_generated_configurations_round_trip_through_etl_config(
    max_attempts: int,
    chunk: int,
    poll: float,
    system: str,
    template: str,
    tokens: int,
    cache: bool,
    task_name: str,
    tz: str,
) -> None:
    tables = {
        "submit": {"max_attempts": max_attempts},
        "collect": {"chunk_size": chunk},
        "schedule": {"poll_minutes": poll, "timezone": tz},
        "tasks": {
            "default": {"model": "claude-haiku-4-5", "template": "{body}"},
            task_name: {
                "model": "claude-sonnet-4-5",
                "system": system or "s",
                "template": template,
                "max_tokens": tokens,
                "cache_system": cache,
            },
        },
    }
    first = config._build(tomllib.loads(dumps(tables)), ENV, problems := [], "a", ROOT)
    assert first is not None, problems
    again = config._build(tomllib.loads(render(first)), ENV, problems, "b", ROOT)
    assert again is not None, problems
    _same(again, first)
