"""A pre-warmed launcher for `etl` processes: the matrix starts hundreds of them.

`python -m etl.cli` spends about 2.5 s importing the SDK, SQLAlchemy and psycopg before doing any work;
at hundreds of runs per scenario matrix that is most of the CI budget. This server imports everything
once, then forks one child per request. Each child is a real, separate process: it gets its own
environment, working directory, stdout/stderr files and database connections, runs the real
`etl.cli.main`, and can be SIGKILLed, SIGSTOPped or killed by a failpoint like any other.

Protocol (JSON lines): stdin `{"args", "env", "cwd", "out", "err"}` -> stdout `{"pid": n}` at once, then
`{"exit": pid, "rc": code}` when it ends (negative code = killed by that signal, as with subprocess).
"""

from __future__ import annotations

import json
import os
import select
import sys


def _warm() -> None:
    import anthropic
    import anthropic.resources.messages.batches
    import httpx2  # noqa: F401
    import psycopg  # noqa: F401
    import sqlalchemy.dialects.postgresql
    import sqlalchemy.dialects.sqlite  # noqa: F401

    import etl.cli
    import etl.collector
    import etl.reconciler
    import etl.report
    import etl.status
    import etl.store.migrate
    import etl.submitter  # noqa: F401

    anthropic.Anthropic(api_key="warm", base_url="http://127.0.0.1:9").close()


def _child(req: dict[str, object]) -> None:
    try:
        os.setpgid(0, 0)
        os.chdir(str(req["cwd"]))
        out = os.open(str(req["out"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(str(req["err"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        env = req["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        args = req["args"]
        assert isinstance(args, list)
        sys.argv = ["etl", *map(str, args)]
        from etl.cli import main

        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child must never return into the server loop
        import traceback

        traceback.print_exc()
        rc = 70
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


def main() -> None:
    _warm()
    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    children: set[int] = set()
    stdin = sys.stdin.buffer
    buf = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.01)
        if ready:
            data = os.read(stdin.fileno(), 1 << 16)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req)
                children.add(pid)
                out.write(json.dumps({"pid": pid, "tag": req.get("tag")}) + "\n")
                out.flush()
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            out.write(json.dumps({"exit": pid, "rc": rc}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
