"""Garbage collection paused while a batch is built or collected; the imported modules kept out of it."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_gc_lock = threading.Lock()
_gc_pauses = 0  # jobs running inside `gc_paused` (the daemon may run a submit and a collect at once)
_gc_was_enabled = [True]
_frozen = threading.Event()


def freeze_imports() -> None:
    """Once a process has loaded what it runs on (the SDK, SQLAlchemy: ~200,000 objects), move every
    object alive to the collector's permanent generation (`gc.freeze`), once per process.

    Each batch leaves more than a hundred thousand new objects behind (its expected rows), so about one
    full collection follows each batch, and a full collection visits every object alive: the modules'
    own objects took 0.13 s of each (measured), 2 s of a million-result collect's 23 s of CPU. Frozen
    objects are still freed by reference counting; only a reference cycle among objects alive at this
    instant would never be collected, once (Python's documented use of `gc.freeze` at start-up).
    """
    if _frozen.is_set():
        return
    _frozen.set()
    gc.freeze()


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is built or collected.

    A batch makes hundreds of thousands of short-lived dicts and strings, freed by reference counting;
    with the collector on, each few thousand allocations trigger a scan, and the older generations (the
    batch's expected rows, everything imported) are scanned again and again: 1.3 s of an 8.5 s
    `etl collect` of 100,000 results, 1 s of a 13 s `etl submit` (bench/RESULTS.md). The few cycles a
    batch makes are collected when the collector runs again after it.
    """
    global _gc_pauses
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled[0] = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled[0]:
                gc.enable()
