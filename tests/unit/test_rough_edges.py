"""Issue 22's rough edges that need no database: URLs, masks, time syntax, money formatting."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl import budget, costs, estimate, moments
from etl import config as config_mod
from etl.config import base_url_problem, mask_url

HOSTS = st.sampled_from(["127.0.0.1", "localhost", "api.anthropic.com", "emulator.internal"])
PORTS = st.integers(min_value=1, max_value=65535)


# -- 2. the API base URL is checked at start ---------------------------------------------------------


@given(host=HOSTS, port=PORTS)
def test_a_base_url_without_scheme_is_refused_naming_it(host: str, port: int) -> None:
    url = f"{host}:{port}"
    problem = base_url_problem(url, "ANTHROPIC_BASE_URL")
    assert problem is not None and url in problem and "http://" in problem


@given(scheme=st.sampled_from(["http", "https"]), host=HOSTS, port=PORTS, slash=st.sampled_from(["", "/"]))
def test_a_base_url_ending_in_v1_is_refused_with_the_fix(
    scheme: str, host: str, port: int, slash: str
) -> None:
    problem = base_url_problem(f"{scheme}://{host}:{port}/v1{slash}", "api.base_url")
    assert problem is not None and f"drop it: {scheme}://{host}:{port}" in problem


@given(
    scheme=st.sampled_from(["http", "https"]),
    host=HOSTS,
    port=PORTS,
    path=st.sampled_from(["", "/", "/proxy"]),
)
def test_a_whole_base_url_is_accepted(scheme: str, host: str, port: int, path: str) -> None:
    assert base_url_problem(f"{scheme}://{host}:{port}{path}", "ANTHROPIC_BASE_URL") is None


# -- 3. a password with `@` is masked whole ----------------------------------------------------------

PASSWORD_CHARS = string.ascii_letters + string.digits + "@:/!#$%^&*()-_=+"


@given(
    user=st.text(string.ascii_lowercase, min_size=1, max_size=8),
    password=st.text(PASSWORD_CHARS, min_size=1, max_size=20),
    host=HOSTS,
)
def test_a_password_is_masked_whole_whatever_it_holds(user: str, password: str, host: str) -> None:
    masked = mask_url(f"postgresql://{user}:{password}@{host}:5432/etl")
    assert masked == f"postgresql://{user}:***@{host}:5432/etl"


def test_urls_without_a_password_are_left_as_they_are() -> None:
    for url in (
        "sqlite:////var/lib/etl/a@b.db",
        "postgresql://etl@db/etl",
        "postgresql:///etl",
        "http://h:1",
    ):
        assert mask_url(url) == url


# -- 6. count_tokens' measure scales the system prompt as it scales the messages ----------------------


@pytest.fixture(scope="module")
def costings(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, budget.Costing]:
    """A task with a long system prompt, plain and cached."""
    out = {}
    for cached in (False, True):
        path = tmp_path_factory.mktemp("cfg") / "etl.toml"
        path.write_text(
            '[tasks.default]\nmodel = "claude-haiku-4-5"\nsystem = "' + "rule " * 400 + '"\n'
            f'template = "{{body}}"\nmax_tokens = 10\ncache_system = {str(cached).lower()}\n',
            encoding="utf-8",
        )
        out[cached] = budget.Costing(config_mod.load({"ETL_DATABASE_URL": "sqlite:///unused.db"}, path))
    return out


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached-system"])
@given(
    documents=st.integers(min_value=1, max_value=500),
    message_tokens=st.integers(min_value=1, max_value=2000),
    batches=st.integers(min_value=1, max_value=5),
    ratio=st.sampled_from([0.8, 1.0, 1.111, 1.5, 2.0]),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
def test_a_measured_ratio_scales_the_system_prompt_too(
    costings: dict[bool, budget.Costing],
    cached: bool,
    documents: int,
    message_tokens: int,
    batches: int,
    ratio: float,
) -> None:
    cost = costings[cached].tasks["default"]
    line = estimate.TaskEstimate(
        "default", "claude-haiku-4-5", documents=documents, batches=min(batches, documents)
    )
    line.message_tokens = message_tokens * documents
    estimate.measure(line, cost, ratio)
    counted = line.input_tokens + line.cache_write_tokens + line.cache_read_tokens
    local = line.message_tokens + documents * cost.system_tokens
    assert abs(counted - ratio * local) <= 1 + documents  # rounding of two products, nothing more


# -- 5. one time syntax for every --since/--until/--older-than -----------------------------------------

NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)


@given(amount=st.integers(min_value=0, max_value=10_000), unit=st.sampled_from("smhdwSMHDW"))
def test_a_duration_is_that_long_before_now(amount: int, unit: str) -> None:
    names = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    moment = moments.parse(f"{amount}{unit}")
    assert moment.resolve(NOW) == NOW - timedelta(**{names[unit.lower()]: amount})


@given(
    at=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)), date_only=st.booleans()
)
def test_an_iso_time_is_itself_in_utc_unless_it_says(at: datetime, date_only: bool) -> None:
    text = at.date().isoformat() if date_only else at.isoformat()
    expected = datetime.fromisoformat(text).replace(tzinfo=UTC)
    assert moments.parse(text).resolve(NOW) == expected
    assert moments.parse(text + "+02:00" if not date_only else text).resolve(NOW) == (
        expected - timedelta(hours=2) if not date_only else expected
    )


@given(text=st.text(min_size=1, max_size=12).filter(lambda t: not t.strip()[:1].isdigit()))
def test_anything_else_is_refused_saying_the_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="is not a time: give an ISO date"):
        moments.parse(text)


# -- 7. tasks in one order everywhere -----------------------------------------------------------------


@given(
    names=st.lists(
        st.text(string.ascii_lowercase + "_-", min_size=1, max_size=8), min_size=1, max_size=6, unique=True
    )
)
def test_per_task_lines_come_in_one_order_whatever_order_they_were_stored_in(names: list[str]) -> None:
    """PostgreSQL's JSONB hands a saved report back with its keys in its own order: the readable report
    orders tasks by name (the whole night's cap first) in every section."""
    row = {"model": "m", "documents": 1, "cost_usd": "1", "standard_cost_usd": "2", "savings_usd": "1"}
    row |= {"estimated_usd": None, "accuracy": None}
    body = {
        "costs": {n: row for n in names},
        "budget": {
            "night": "2026-12-04",
            "caps_usd": {n: "1" for n in [*names, "*"]},
            "reserved_usd": "0",
            "waiting_documents": {n: 1 for n in names},
        },
    }
    lines = costs.render_tasks(body)[2:-1]
    assert [line.split()[0] for line in lines] == sorted(names)
    cap_line, waiting = costs.render_budget(body)
    caps = cap_line.split(": ", 1)[1].split("; sent")[0]
    assert caps == ", ".join(["$1", *(f"$1 for {n}" for n in sorted(names))])
    assert waiting.split(": ", 1)[1] == ", ".join(f"{n} 1" for n in sorted(names))
