"""A preloaded process that forks agent lives on command, over its stdin/stdout (no sockets).

Why: the kill -9 test needs 50+ agent processes; starting each from scratch costs seconds of
imports on a shared 2-core machine. This launcher imports the agent once, then each ``start``
forks a child that runs ``vi-edge run --config PATH`` - a real, separate process the test kills with
SIGKILL by its pid. Commands (one per line): ``start PATH [nocrash]`` → ``PID``;
``wait PID SECONDS`` → ``alive`` or the exit code (negative = signal); ``reap PID`` → exit code.
"""

from __future__ import annotations

import os
import sys
import time

import onnxruntime  # noqa: F401

import edge.agent
import edge.httpapi
import edge.sources
import edge.sync  # noqa: F401


def _code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> None:
    out = sys.stdout
    for line in sys.stdin:
        command, *args = line.split()
        if command == "start":
            pid = os.fork()
            if pid == 0:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                if "nocrash" in args[1:]:
                    os.environ.pop("VI_EDGE_CRASH_POINTS", None)
                from edge.__main__ import main as edge_main

                os._exit(edge_main(["run", "--config", args[0]]))
            print(pid, file=out, flush=True)
        elif command == "wait":
            pid, deadline = int(args[0]), time.monotonic() + float(args[1])
            answer = "alive"
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    answer = str(_code(status))
                    break
                time.sleep(0.01)
            print(answer, file=out, flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(_code(status), file=out, flush=True)


if __name__ == "__main__":
    main()
