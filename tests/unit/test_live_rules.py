"""The live path's pure parts: the routing rule, the pacer (time passed in, never slept), its config."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from hypothesis import given
from hypothesis import strategies as st

from etl import config, routing
from etl.clock import utcnow
from etl.errors import ConfigError
from etl.pacer import Pacer

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 12, 2, 13, 0, tzinfo=UTC)
moments = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
)


@given(mode=st.sampled_from([None, "live", "batch"]), due_by=st.none() | moments, limit=moments)
def test_the_rule_is_live_for_live_batch_for_batch_and_otherwise_the_deadline(
    mode: str | None, due_by: datetime | None, limit: datetime
) -> None:
    expected = mode == "live" or (mode is None and due_by is not None and due_by < limit)
    assert routing.goes_live(mode, due_by, limit) is expected


def test_the_cutoff_is_the_next_submit_slot_plus_the_allowance_and_the_submit_run_departs_now() -> None:
    cfg = config.load({}, ROOT / "config" / "etl.toml")
    assert routing.cutoff(cfg, T0) == datetime(2026, 12, 4, 0, 0, tzinfo=UTC)  # 00:00 tomorrow + 24 h
    assert routing.cutoff(cfg, T0, departing=True) == T0 + timedelta(hours=24)


def test_the_cutoff_follows_the_one_clock_seam() -> None:
    """freezegun at the one function that reads the wall clock, nothing that sleeps under it."""
    cfg = config.load({}, ROOT / "config" / "etl.toml")
    with freeze_time("2026-12-02 23:59:59"):
        before = routing.cutoff(cfg, utcnow())
    with freeze_time("2026-12-03 00:00:01"):
        after = routing.cutoff(cfg, utcnow())
    assert before == datetime(2026, 12, 4, 0, 0, tzinfo=UTC)
    # the slot fired a second ago: its batch is leaving now (the hold), not tomorrow's
    assert after == datetime(2026, 12, 4, 0, 0, 1, tzinfo=UTC)


@given(seconds=st.integers(min_value=-3600, max_value=3 * 3600))
def test_after_a_slot_fires_the_live_worker_and_the_submit_agree_for_the_hold_then_the_next_slot_counts(
    seconds: int,
) -> None:
    """Without the hold, from 00:00:01 the live worker routed by tomorrow's slot while tonight's submit
    was still claiming by tonight's: rows due between the two cutoffs went live at the standard price."""
    cfg = config.load({}, ROOT / "config" / "etl.toml")
    slot = datetime(2026, 12, 3, 0, 0, tzinfo=UTC)
    now = slot + timedelta(seconds=seconds)
    hold = timedelta(minutes=cfg.live.slot_hold_minutes)
    got = routing.cutoff(cfg, now)
    if timedelta(0) <= now - slot < hold:
        assert got == routing.cutoff(cfg, now, departing=True) == now + timedelta(hours=24)
    elif now < slot:
        assert got == slot + timedelta(hours=24)
    else:
        assert got == slot + timedelta(days=1, hours=24)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_the_pacer_allows_rpm_calls_per_minute_and_waits_on_the_clock() -> None:
    clock, stop = FakeClock(), threading.Event()
    pacer = Pacer(3, clock, stop)
    assert all(pacer.acquire() for _ in range(3))
    assert pacer._ready_at(clock()) == T0 + timedelta(seconds=60)
    clock.now += timedelta(seconds=60)
    assert pacer.acquire()


def test_the_pacer_honours_retry_after_and_an_exhausted_ratelimit_until_its_reset() -> None:
    clock, stop = FakeClock(), threading.Event()
    pacer = Pacer(1000, clock, stop)
    pacer.observe({"retry-after": "7"}, T0)
    assert pacer._ready_at(T0) == T0 + timedelta(seconds=7)
    pacer.observe(
        {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2026-12-02T13:00:30Z",
        },
        T0,
    )
    assert pacer._ready_at(T0) == T0 + timedelta(seconds=30)
    pacer.observe({"anthropic-ratelimit-tokens-remaining": "5000"}, T0)  # not exhausted: nothing changes
    assert pacer._ready_at(T0) == T0 + timedelta(seconds=30)


def test_a_stopped_pacer_gives_up_waiting() -> None:
    clock, stop = FakeClock(), threading.Event()
    pacer = Pacer(1, clock, stop)
    assert pacer.acquire()
    stop.set()
    assert pacer.acquire() is False


def test_live_settings_are_validated_with_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "etl.toml"
    path.write_text(
        "[live]\nconcurrency = 0\ndaily_spend_cap_usd = -1\nspeed = 3\n"
        "[tasks.default]\nmodel = 'claude-haiku-4-5'\nlive = 'yes'\n"
    )
    with pytest.raises(ConfigError) as caught:
        config.load({}, path)
    text = str(caught.value)
    for expected in (
        "live.concurrency must be positive",
        "live.daily_spend_cap_usd must be 0 (no cap) or positive",
        "unknown setting live.speed",
        "tasks.default.live must be true or false",
    ):
        assert expected in text


def test_the_shipped_config_turns_the_live_path_on_with_the_documented_defaults() -> None:
    cfg = config.load({}, ROOT / "config" / "etl.toml")
    assert cfg.live == config.LiveSettings()
    assert all(task.live for task in cfg.tasks.values())
