"""What the emulator itself spends per create and per results stream, without HTTP and without etl.

    .venv/bin/python bench/emulator_cost.py --docs 100000            # this tree
    .venv/bin/python bench/emulator_cost.py --docs 100000 --tree DIR # another checkout, for before/after

The documents and request bytes of `bench/run.py` (1 KB bodies, the tasks of config/etl.toml); CPU seconds
(`time.process_time`) of parsing and storing one create body (with `--processing-seconds 0` the batch is
finished inside the create, as in the bench), then of producing every results line. `--profile` prints
the top of a cProfile of each.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose emulator is measured")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    sys.path.insert(0, str(HERE))
    import run as bench
    from _shared import DEFAULT_CONFIG, encode, load_config, task_params

    from etl import codec
    from etl.emulator import server
    from etl.emulator.state import result_lines

    tasks = task_params(load_config(DEFAULT_CONFIG))
    parts = (encode(i, k, t, b, m, tasks) for i, (k, b, t, m) in enumerate(bench.documents(args.docs), 1))
    body = b'{"requests":[' + b",".join(parts) + b"]}"
    loads = codec.loads if "codec.loads" in inspect.getsource(server) else json.loads  # what the tree uses
    emulator = server.EmulatorServer(server.EmulatorConfig(port=0, processing_seconds=0))
    batch = None
    for what in ("create", "stream"):
        profile = cProfile.Profile() if args.profile else None
        start = time.process_time()
        if profile:
            profile.enable()
        if what == "create":
            batch = emulator.state.create(server.parse_create_body(loads(body)), "2023-06-01")
        else:
            assert batch is not None
            sum(len(line) for line in result_lines(batch, emulator.config.seed))
        if profile:
            profile.disable()
        print(
            f"{what}: {time.process_time() - start:.2f} s CPU for {args.docs} requests ({len(body) / 2**20:.0f} MiB)"
        )
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
