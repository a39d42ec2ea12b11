"""Random kills: seeded SIGKILL schedules over full submit/collect cycles, then a restart to completion.

Each seed picks a database (PostgreSQL every tenth seed, SQLite otherwise), a small queue, and a schedule:
the first submit always dies at a random submit failpoint; later steps die at a random failpoint (n-th
pass) or at a random moment (a real SIGKILL from outside), or run clean. 100 seeds per CI run; set
ETL_MATRIX_RANDOM=1000 (or any number) for a nightly-sized run. A failing seed reruns alone with
`-k "seed-<n>]"`.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from etl.failpoints import POINTS
from tests.reliability.harness import PROCESSING_SECONDS, Scenario
from tests.reliability.launcher import Finished

SEEDS = int(os.environ.get("ETL_MATRIX_RANDOM", "100"))
SUBMIT_POINTS = [p for p in POINTS if p.startswith(("submit.", "reconcile."))]
COLLECT_POINTS = [p for p in POINTS if p.startswith(("collect.", "requeue."))]


def _step(sc: Scenario, rng: random.Random, args: list[str], points: list[str], log: list[str]) -> Finished:
    roll = rng.random()
    if roll < 0.4:
        point = rng.choice(points)
        nth = rng.randint(1, 2)
        done = sc.run(*args, failpoints=f"{point}=kill@{nth}")
        log.append(f"{args[0]}:{point}@{nth}->{done.returncode}")
        return done
    if roll < 0.8:
        delay = rng.uniform(0.0, 0.3)
        child = sc.spawn(*args)
        time.sleep(delay)  # the random moment IS the fault
        child.signal(signal.SIGKILL)
        done = child.wait(60)
        sc.runs.append(done)
        log.append(f"{args[0]}:t+{delay:.2f}s->{done.returncode}")
        return done
    done = sc.run(*args)
    log.append(f"{args[0]}:clean->{done.returncode}")
    return done


@pytest.mark.parametrize("seed", range(SEEDS), ids=[f"seed-{s}" for s in range(SEEDS)])
def test_random_sigkill_schedule_then_restart_keeps_every_invariant(
    seed: int, make_scenario: Callable[..., Scenario]
) -> None:
    rng = random.Random(seed)
    db = "postgresql" if seed % 10 == 9 else "sqlite"
    sc = make_scenario(f"random kills seed {seed}", db)
    sc.insert_plain(rng.randint(3, 11), prefix=f"s{seed}-")
    if rng.random() < 0.3:
        sc.control.set_faults(
            outcomes=[{"custom_id": r"q\d*[3](_.*)?", "outcome": "errored", "error_type": "overloaded_error"}]
        )
    log: list[str] = []
    first_point = rng.choice([p for p in SUBMIT_POINTS if p.startswith("submit.")])
    if first_point == "submit.during_create":
        sc.control.set_faults(
            rules=[{"endpoint": "create", "action": "ambiguous", "delay_seconds": 2, "times": 1}],
            mode="append",
        )
    first = sc.run("submit", failpoints=f"{first_point}=kill")
    log.append(f"submit:{first_point}->{first.returncode}")
    kills = int(first.killed)
    for _ in range(rng.randint(1, 3)):
        sc.clock.advance(rng.choice([0, PROCESSING_SECONDS + 60, 800]))
        kills += _step(sc, rng, ["submit"], SUBMIT_POINTS, log).killed
        sc.clock.advance(PROCESSING_SECONDS + 60)
        kills += _step(sc, rng, ["collect", "--no-report"], COLLECT_POINTS, log).killed
    sc.control.clear_faults()
    sc.complete(rounds=8)
    sc.verdict((first.killed, f"{kills} SIGKILLs: {' '.join(log)}"))
