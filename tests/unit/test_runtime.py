"""Garbage collection is paused while batches run and restored after; the provider can be built ahead."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from etl.api import Api
from etl.errors import ConfigError
from etl.memory import gc_paused
from etl.store.databases import Databases
from tests.harness import Harness


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_gc_is_off_inside_and_back_on_after() -> None:
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_pauses_turn_gc_back_on_only_when_the_last_ends() -> None:
    gc.enable()
    first = gc_paused()
    second = gc_paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the daemon's submit ends while its collect still runs
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_gc_left_off_by_the_caller_stays_off() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_an_exception_still_restores_gc() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def _runtime(factory: Any) -> Harness:
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    return Harness(config=None, db=Databases.one(engine), api=Api(factory))  # type: ignore[arg-type]


def test_a_warmed_provider_is_built_once_on_another_thread_and_handed_over() -> None:
    built_on: list[str] = []
    release = threading.Event()

    def factory() -> Any:
        release.wait(10)
        built_on.append(threading.current_thread().name)
        return object()

    rt = _runtime(factory)
    rt.warm_provider()
    rt.warm_provider()  # already warming: no second build
    release.set()
    first = rt.provider
    assert rt.provider is first
    assert built_on == ["etl-provider-warm"]


def test_a_warm_up_that_fails_raises_its_error_where_the_provider_is_used() -> None:
    calls: list[int] = []

    def factory() -> Any:
        calls.append(1)
        raise ConfigError(["no API key: set ANTHROPIC_API_KEY"])

    rt = _runtime(factory)
    rt.warm_provider()
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        _ = rt.provider
    assert len(calls) == 2  # the warm-up's failure, then the build that raised it to the caller
