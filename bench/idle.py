"""The idle daemon: `etl run` with nothing queued, its resident memory and CPU over one idle minute.

    .venv/bin/python bench/idle.py --db postgresql --seconds 60
    .venv/bin/python bench/idle.py --db sqlite --seconds 60

A fresh database (schema only, empty queue), the emulator as its own process, then `etl run`. After a
warm-up (start-up, leader lease, any catch-up run on the empty queue), CPU time (utime + stime from
/proc/PID/stat) is sampled at the start and the end of the idle window, and RSS from /proc/PID/status
every second. Then SIGTERM, and wait4 gives the kernel's totals for the whole life of the process.
The last line: `IDLE db=... seconds=... idle_cpu_s=... cpu_s_per_min=... rss_mb=... peak_rss_mb=...
startup_cpu_s=...`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import DEFAULT_CONFIG, ROOT
from run import PG_ADMIN, Database, Emulator, measure

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the idle window")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds after start before the window opens")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--pg-admin", default=PG_ADMIN)
    args = p.parse_args(argv)
    python = sys.executable
    workdir = Path(tempfile.mkdtemp(prefix="etl-idle-"))
    db = Database(args.db, workdir, args.pg_admin)
    emulator: Emulator | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_"))}
        env.update(
            {"ETL_CONFIG": str(args.config), "ETL_DATABASE_URL": db.url, "ANTHROPIC_API_KEY": "bench-key"}
        )
        measure("db_upgrade", [python, "-m", "etl.cli", "db", "upgrade"], env, workdir)
        emulator = Emulator(python, workdir)
        env["ANTHROPIC_BASE_URL"] = emulator.base_url
        with (workdir / "run.err").open("wb") as err:
            proc = subprocess.Popen(
                [python, "-m", "etl.cli", "run"], env=env, stdout=err, stderr=err, cwd=ROOT
            )
        time.sleep(args.warmup)
        if proc.poll() is not None:
            raise SystemExit(
                f"etl run exited {proc.returncode}:\n{(workdir / 'run.err').read_text()[-3000:]}"
            )
        startup_cpu = cpu_seconds(proc.pid)
        start = time.monotonic()
        peak = 0.0
        rss = 0.0
        while time.monotonic() - start < args.seconds:
            time.sleep(1.0)
            rss, _ = rss_mb(proc.pid)
            peak = max(peak, rss)
        idle_cpu = cpu_seconds(proc.pid) - startup_cpu
        window = time.monotonic() - start
        _, hwm = rss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc = None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if emulator is not None:
            emulator.stop()
        db.drop()
    log = (workdir / "run.err").read_text(errors="replace")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"etl run: exit {os.waitstatus_to_exitcode(status)} after SIGTERM; {log.count(chr(10))} log lines")
    print(f"window {window:.1f}s: cpu {idle_cpu:.2f}s, RSS at end {rss:.1f} MB, max sampled {peak:.1f} MB")
    print(
        f"whole life (wait4): cpu {usage.ru_utime + usage.ru_stime:.2f}s, peak RSS {usage.ru_maxrss / 1024:.1f} MB"
    )
    print(
        f"IDLE db={args.db} seconds={window:.0f} idle_cpu_s={idle_cpu:.2f} "
        f"cpu_s_per_min={idle_cpu * 60 / window:.2f} rss_mb={rss:.0f} peak_rss_mb={max(hwm, usage.ru_maxrss / 1024):.0f} "
        f"startup_cpu_s={startup_cpu:.2f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
