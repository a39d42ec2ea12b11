"""Client side of the zygote: start real `etl` processes cheaply, wait for them, signal them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Finished:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def __str__(self) -> str:
        return f"etl {' '.join(self.args)} -> {self.returncode}\n{self.stdout}\n{self.stderr[-3000:]}"


class Child:
    """One running `etl` process."""

    def __init__(self, launcher: Launcher, pid: int, args: list[str], out: Path, err: Path) -> None:
        self.launcher = launcher
        self.pid = pid
        self.args = args
        self.out = out
        self.err = err

    def poll(self) -> int | None:
        return self.launcher._exits.get(self.pid)

    def wait(self, timeout: float = 120) -> Finished:
        deadline = time.monotonic() + timeout
        with self.launcher._cond:
            while self.pid not in self.launcher._exits:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.signal(signal.SIGKILL)
                    raise TimeoutError(
                        f"etl {' '.join(self.args)} (pid {self.pid}) still running after {timeout}s"
                    )
                self.launcher._cond.wait(left)
            rc = self.launcher._exits[self.pid]
        return Finished(
            self.args, rc, self.out.read_text(errors="replace"), self.err.read_text(errors="replace")
        )

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def state(self) -> str:
        """The kernel's process state letter (`T` = stopped), or '' once gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return ""
        return stat.rsplit(")", 1)[1].split()[0]

    def wait_stopped(self, timeout: float = 60) -> bool:
        """Poll (bounded) until the process stops itself at a `stop` failpoint or exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return False
            if self.state() == "T":
                return True
            time.sleep(0.01)
        return False


class Launcher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.zygote"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._proc.stdout is not None
        first = json.loads(self._proc.stdout.readline())
        assert "ready" in first, first
        self._cond = threading.Condition()
        self._exits: dict[int, int] = {}
        self._pids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.started = 0

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            msg = json.loads(line)
            with self._cond:
                if "exit" in msg:
                    self._exits[msg["exit"]] = msg["rc"]
                else:
                    self._pids[msg["tag"]] = msg["pid"]
                self._cond.notify_all()

    def spawn(self, args: list[str], env: dict[str, str]) -> Child:
        tag = uuid.uuid4().hex[:10]
        out = self.workdir / f"{tag}.out"
        err = self.workdir / f"{tag}.err"
        # Created here, not only in the child: a child killed straight after the fork (random kill schedules
        # can do that) never opens them, and its empty output is still an answer.
        out.touch()
        err.touch()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ETL_", "ANTHROPIC_", "PYTEST"))}
        full_env.update(env)
        req = {"args": args, "env": full_env, "cwd": str(ROOT), "out": str(out), "err": str(err), "tag": tag}
        with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
        with self._cond:
            while tag not in self._pids:
                self._cond.wait(30)
            pid = self._pids.pop(tag)
        self.started += 1
        return Child(self, pid, args, out, err)

    def run(self, args: list[str], env: dict[str, str], timeout: float = 120) -> Finished:
        return self.spawn(args, env).wait(timeout)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
