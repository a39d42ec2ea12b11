"""The stateful fault model (tests/reliability/stateful.py) on SQLite and PostgreSQL, and every failure it
ever found, kept as a named, deterministic regression example.

CI size: `ETL_STATEFUL_EXAMPLES` examples per database (default 200); the nightly size is
`ETL_STATEFUL_EXAMPLES=5000 ETL_STATEFUL_RANDOM=1` (new draws each night). In CI the draws are
derandomized, so a run is reproducible. The fault combinations reached are printed at the end of the
session and written to `stateful-combinations-<db>.txt` in pytest's temporary directory.
`ETL_STATEFUL_SHRINK=0` reports the first failing sequence without shrinking it (hunting).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from etl.emulator import EmulatorServer
from tests.reliability import stateful
from tests.reliability.stateful import World

STEPS_PER_EXAMPLE = int(os.environ.get("ETL_STATEFUL_STEPS", "8"))
SUMMARY: list[str] = []


@pytest.fixture
def world(db_url: str, tmp_path: Path, emulator: EmulatorServer) -> Iterator[World]:
    shm = Path("/dev/shm")
    sqlite_file: Path | None = None
    if db_url.startswith("sqlite") and shm.is_dir():
        # The same fresh SQLite file, on tmpfs: each commit's fsync (about 9 ms on this disk) is most of a
        # run's cost otherwise, and what is tested is the transactions, not the disk.
        sqlite_file = shm / f"etl-stateful-{uuid.uuid4().hex[:12]}.db"
        db_url = f"sqlite:///{sqlite_file}"
    w = stateful.make_world(
        "sqlite" if db_url.startswith("sqlite") else "postgresql", db_url, tmp_path, emulator
    )
    yield w
    w.engine.dispose()
    other = Path(w.other_url.removeprefix("sqlite:///"))
    if w.other_engine is not None:
        w.other_engine.dispose()
    for db_file in (sqlite_file, other):
        if db_file is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db_file}{suffix}").unlink(missing_ok=True)
            shutil.rmtree(f"{db_file}.owners", ignore_errors=True)
    if w.provider is not None:
        w.provider._inner.close()


@pytest.mark.timeout(1800)
def test_generated_fault_sequences_keep_every_invariant(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    n = stateful.examples_per_db()
    try:
        run_state_machine_as_test(
            stateful.machine_for(world),
            settings=settings(
                max_examples=n,
                stateful_step_count=STEPS_PER_EXAMPLE,
                # CI: the same draws every run. Nightly (ETL_STATEFUL_RANDOM=1): new ones each night.
                derandomize=os.environ.get("ETL_STATEFUL_RANDOM", "0") != "1",
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
                report_multiple_bugs=False,
                # ETL_STATEFUL_SHRINK=0 when hunting: report the first failing sequence as found
                phases=[Phase.explicit, Phase.reuse, Phase.generate]
                + ([Phase.shrink] if os.environ.get("ETL_STATEFUL_SHRINK", "1") != "0" else []),
            ),
        )
        # A rule that matches none of the ids we send serves nothing and fails nothing: once rows were due
        # an odd line in many examples (CI size: 31 on SQLite, 48 on PostgreSQL), some line was served.
        due, served = world.actors["odd-rows-due"], world.actors["odd-line-served"]
        assert due < 20 or served, f"{due} rows were due an odd results line and not one line was served"
    finally:
        combos = world.combos
        line = (
            f"stateful[{world.db}]: {world.examples} examples, {sum(combos.values())} etl runs with faults drawn "
            f"({world.runs} in all, {1000 * world.run_seconds / max(world.runs, 1):.0f} ms each), "
            f"{len(combos)} distinct fault combinations reached; actors: "
            + (", ".join(f"{k} {v}" for k, v in sorted(world.actors.items())) or "none")
        )
        SUMMARY.append(line)
        path = tmp_path_factory.getbasetemp() / f"stateful-combinations-{world.db}.txt"
        path.write_text(
            line + "\n" + "".join(f"{c:6d}  {k}\n" for k, c in combos.most_common()), encoding="utf-8"
        )
        SUMMARY.append(f"  combinations written to {path}")


# --- every failure the model found, as a named, deterministic example (both databases) ---------------------
# Each replays the step sequence Hypothesis reported, judged after every step and completed at the end
# exactly as a generated example is.

GOOD = "default"
LONG_KEY = stateful._noise(12, 3000)  # 3,000 incompressible characters: past PostgreSQL's btree entry limit


def test_two_queued_rows_of_one_key_bill_only_the_newest(world: World) -> None:
    """Found by the model on the first run (before i12's fix): both rows of a (doc_key, task) queued
    together were sent and billed, and the older result was thrown away."""
    stateful.replay(
        world,
        [
            (
                "enqueue",
                {"batch": [("good", "k", "first version", GOOD), ("good", "k", "second version", GOOD)]},
            ),
            ("submit", {}),
            ("time_passes", {"seconds": 300}),
            ("collect", {}),
        ],
    )


def test_ambiguous_create_whose_lookalike_results_break_at_byte_zero_is_not_released(world: World) -> None:
    """Issue 12 finding 1 as model steps: the create's answer is lost, the look-alike's first-result read
    breaks before its first byte; a failed read must not count as "not ours"."""
    stateful.replay(
        world,
        [
            ("enqueue", {"batch": [("good", f"d{i}", f"document {i}", GOOD) for i in range(6)]}),
            ("submit", {"fault": {"endpoint": "create", "action": "ambiguous", "drop": True}}),
            ("time_passes", {"seconds": 1200}),
            ("reconcile", {"fault": {"endpoint": "results", "action": "break_at", "at_byte": 0}, "times": 2}),
            ("time_passes", {"seconds": 1200}),
            ("submit", {"fault": {"endpoint": "results", "action": "break_at", "at_byte": 37}}),
        ],
    )


def test_ambiguous_create_with_the_host_clock_off_the_apis_either_way_is_adopted(world: World) -> None:
    """Issue 12 finding 2 as model steps: host 600 s ahead of the API, then the API 20 min ahead of the
    host; the look-alike must still be found and adopted, never re-sent."""
    stateful.replay(
        world,
        [
            ("enqueue", {"batch": [("good", f"d{i}", f"document {i}", GOOD) for i in range(5)]}),
            ("clock_steps", {"side": "host", "delta": 600}),
            ("submit", {"fault": {"endpoint": "create", "action": "ambiguous", "drop": True}}),
            ("time_passes", {"seconds": 1200}),
            ("clock_steps", {"side": "api", "delta": 1800}),
            ("reconcile", {}),
            ("clock_steps", {"side": "host", "delta": -3600}),
            ("collect", {}),
        ],
    )


def test_a_long_key_beside_good_rows_blocks_nothing(world: World) -> None:
    """Issue 12 finding 3 as model steps: a 3,000-character key among good rows is refused or isolated,
    and the other rows and batches are collected."""
    stateful.replay(
        world,
        [
            ("enqueue", {"batch": [("good", LONG_KEY, "long key", GOOD), ("good", "a", "short key", GOOD)]}),
            ("submit", {}),
            ("enqueue", {"batch": [("good", "b", "next batch", GOOD)]}),
            ("submit", {}),
            ("time_passes", {"seconds": 300}),
            ("collect", {}),
        ],
    )


def test_crash_and_connection_kill_in_one_collect_then_a_byte_broken_stream(world: World) -> None:
    """Killed connections and a crash mid-collect, then a results stream broken mid-line: collected
    once, billed once."""
    stateful.replay(
        world,
        [
            ("enqueue", {"batch": [("good", f"d{i}", f"document {i}", GOOD) for i in range(6)]}),
            ("submit", {"db_kill": 12}),
            ("submit", {}),
            ("time_passes", {"seconds": 300}),
            ("collect", {"crash": ("collect.mid_stream", 1), "db_kill": 8}),
            ("collect", {"fault": {"endpoint": "results", "action": "break_at", "at_byte": 150}}),
        ],
    )


def test_poison_lines_and_a_disk_full_collect_lose_nothing(world: World) -> None:
    """Issue 21 as model steps: a lone surrogate, a `message` that is a list and a line that is not an
    object for rows of the first batch; the disk fills during the collect, then the next one finishes."""
    from tests.reliability.lines import good_line, good_message, line

    bad = [
        good_line("bad \ud800"),
        line({"type": "succeeded", "message": [good_message()]}),
        "[1, 2]\n" + good_line(),
    ]
    m = stateful.replay(
        world,
        [
            ("enqueue", {"batch": [("good", f"d{i}", f"document {i}", GOOD) for i in range(8)]}),
            ("odd_results", {"lines": bad, "picks": [0, 1, 2]}),
            ("submit", {}),
            ("time_passes", {"seconds": 300}),
            ("disk_full", {"command": "collect", "first": 6}),
            ("collect", {}),
        ],
    )
    said = [entry for entry in m.log if "disk_full" in entry]
    assert said and all("exit 74" in entry for entry in said), m.log
    # Each of the three lines was served (a rule matching none of our ids would serve none, silently).
    assert world.actors["odd-rows-due"] == 3 and world.actors["odd-line-served"] >= 3, world.actors


def test_a_claim_never_takes_an_older_version_of_a_queued_document(world: World) -> None:
    """Found by the model once odd_results served its lines again (200 examples, SQLite): a claimer that
    had not superseded just before its claim (here the live twin; in etl, a submit's second and later
    claims, or any claim after a newer version arrived mid-run) took the older version of a document
    whose newer version was queued. Our submit sent the newer one; the twin died, its claim went back to
    the queue with no newer version queued beside it, and the older version was sent and billed."""
    stateful.replay(
        world,
        [
            (
                "enqueue",
                {"batch": [("good", "k", "first version", GOOD)] + [("good", c, c, GOOD) for c in "abc"]},
            ),
            ("enqueue", {"batch": [("good", "k", "second version", GOOD)]}),
            ("twin_claims", {}),
            ("submit", {}),
        ],
    )


def test_a_newer_version_enqueued_during_a_submit_leaves_the_older_unsent(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule through etl's own submit: a run of two batches superseded once, before its first
    claim; a newer version of a document still queued for the second batch arrived after the first claim,
    and the second claim took both versions into one batch (both billed)."""
    from etl import failpoints

    m = stateful.machine_for(world)()
    arrived: list[str] = []
    hit = failpoints.hit

    def newer_version_arrives(name: str) -> None:
        if name == "submit.after_claim" and not arrived:
            arrived.append(name)
            m.enqueue([("good", "k", "second version", GOOD)])
        hit(name)

    monkeypatch.setattr(failpoints, "hit", newer_version_arrives)
    try:
        m.enqueue([("good", c, c, GOOD) for c in "abcd"] + [("good", "k", "first version", GOOD)])
        m.execute("submit")
        assert arrived and m.never_bill == {"q5"}, m.log
        m.nothing_lost_or_paid_twice()
    finally:
        m.teardown()


def test_a_database_wide_kill_also_drops_the_live_twins_proof_of_life(world: World) -> None:
    """Found by the model (200 examples, PostgreSQL): a connection kill terminates every session of the
    database, the live twin's lock session too. Its claim is then released, as docs/survival.md accepts
    for a live process whose lock session dropped and whose pid /proc cannot vouch for: the twin is no
    longer proven alive, and the model's "a live twin's claim is never taken" does not apply to it."""
    m = stateful.replay(
        world,
        [
            ("enqueue", {"batch": [("good", c, c, GOOD) for c in "abcdef"]}),
            ("twin_claims", {}),
            ("submit", {"db_kill": 1}),
            ("submit", {"crash": ("submit.after_claim", 1)}),
        ],
    )
    assert any("twin" in entry for entry in m.log), m.log
