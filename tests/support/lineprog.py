"""A test program that prints lines and reads commands on stdin, run with the shim's
variables of one test (its own runtime folder, the mode)."""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import time
from pathlib import Path

TIMEOUT = 30.0


class LineProgram:
    """A test program that prints lines and reads commands on stdin."""

    def __init__(self, argv: list[str], rundir: Path, mode: str, *,
                 env: dict[str, str] | None = None, block_all: bool = False,
                 address_space: int | None = None) -> None:
        """`block_all`: started with every signal blocked; `address_space`: with that
        RLIMIT_AS (bytes)."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
        full.update({"FENTRY_RUNTIME_DIR": str(rundir), "FENTRY_MODE": mode, **(env or {})})

        def before_exec() -> None:  # in the child: the mask and the limit survive exec
            if block_all:
                signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            if address_space is not None:
                resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, env=full, cwd=rundir,
                                     preexec_fn=before_exec if block_all or address_space else None)
        self.pid = self.proc.pid

    def line(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                out = self.proc.stdout.readline()
                assert out, f"{self.proc.args} exited with status {self.proc.wait()}"
                return out.decode().strip()
            assert self.proc.poll() is None, f"{self.proc.args} died: {self.proc.returncode}"
        raise AssertionError(f"{self.proc.args} printed nothing")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")

    def finish(self) -> dict[str, str]:
        """Ask it to stop ("q"): its counters; it must exit 0."""
        assert self.proc.poll() is None, f"the program died: status {self.proc.returncode}"
        self.send("q")
        fields = dict(kv.split("=") for kv in self.line().split())
        assert self.proc.wait(timeout=TIMEOUT) == 0
        return fields

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
