"""A warm process for `bench/run.py --warm`: the deployed shape, `etl run`, whose imports and API client
are loaded once at start-up and whose nightly submit and morning collect then run inside it.

It loads what `etl run` loads (etl, SQLAlchemy, structlog, the SDK, an API client built), then reads one
JSON request per line on stdin, runs that step in this process and answers one JSON line: wall seconds
and CPU seconds (user + system of the whole process, every thread) of the step alone. The steps call the
functions the daemon's jobs call (`pipeline.submit`; `pipeline.collect` then `report.morning`), each on a
fresh engine (the harness replaces the database between steps) sharing the one API client. The baselines
run here too, warm, through their `main`, so both sides pay no start-up.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    import dataclasses

    import baseline_collect
    import baseline_submit

    from etl import config as config_mod
    from etl import logs, pipeline, report
    from etl.api import Api
    from etl.parts import Parts

    cfg = config_mod.load(dict(os.environ), None)
    logs.configure(cfg.log_level, json=True)
    warm = Parts.open(cfg)
    client = warm.api.provider  # the SDK imported and a client built, as `etl run` does at start-up
    print("ready", flush=True)

    def etl_step(name: str) -> str:
        rt = dataclasses.replace(Parts.open(cfg), api=Api(lambda: client))
        try:
            if name == "etl_submit":
                out: Any = pipeline.submit(rt.config, rt.db, rt.api, rt.me, rt.clock)
                return f"submitted {out.documents} document(s) in {out.batches} batch(es)"
            col = pipeline.collect(rt.config, rt.db, rt.api, rt.me, rt.clock)
            report.morning(rt.config, rt.db, rt.clock())
            return f"collected {col.succeeded} succeeded"
        finally:
            rt.me.life.release()  # the proof-of-life session (etl.life) would hold the database open
            rt.db.close()

    for line in sys.stdin:
        request = json.loads(line)
        name, argv = request["step"], request.get("argv", [])
        captured = io.StringIO()
        start_wall, start_cpu = time.perf_counter(), cpu()
        with contextlib.redirect_stdout(captured):
            if name.startswith("etl_"):
                said = etl_step(name)
            else:
                module = baseline_submit if name == "baseline_submit" else baseline_collect
                sys.argv = [module.__file__ or name, *argv]
                module.main()
                said = captured.getvalue().strip()
        answer = {
            "seconds": time.perf_counter() - start_wall,
            "cpu_s": cpu() - start_cpu,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "output": said,
        }
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
