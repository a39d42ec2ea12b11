"""Issue 22's rough edges that need no database: URLs, masks, time syntax, money formatting."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

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
def test_a_base_url_ending_in_v1_is_refused_with_the_fix(scheme: str, host: str, port: int, slash: str) -> None:
    problem = base_url_problem(f"{scheme}://{host}:{port}/v1{slash}", "api.base_url")
    assert problem is not None and f"drop it: {scheme}://{host}:{port}" in problem


@given(scheme=st.sampled_from(["http", "https"]), host=HOSTS, port=PORTS, path=st.sampled_from(["", "/", "/proxy"]))
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
    for url in ("sqlite:////var/lib/etl/a@b.db", "postgresql://etl@db/etl", "postgresql:///etl", "http://h:1"):
        assert mask_url(url) == url
