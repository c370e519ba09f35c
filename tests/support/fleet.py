"""The fleet tests' programs: tests/programs/fleet_prefork.c (a master forking workers after
start) started and read the same way everywhere, and the CLI's JSON Lines parsed."""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from support.builds import EXAMPLE, PROGRAMS, ServerBuild, build_rel_patch, build_rel_program, server_sources

TIMEOUT = 30.0  # a bound on a start, a stop, a change to show: not a speed requirement


def unique_build() -> list[str]:
    """Link options giving a program a build-id of its own.  `--all` reaches every process of
    a build on the machine: the fleet tests' builds must not be anyone else's."""
    return [f"-Wl,--build-id=0x{secrets.token_hex(20)}"]


def build_program(sources: list[Path], out: Path, cflags: list[str] | None = None) -> Path:
    return build_rel_program(sources, out, cflags=cflags, ldflags=unique_build())


def server_build(factory: pytest.TempPathFactory) -> ServerBuild:
    """The server example (with fix_parse and fix_parse_v2) and another build of it (-O1,
    with its fix_parse), each with a build-id of its own."""
    d = factory.mktemp("fleet_server")
    binary = build_program(server_sources(), d / "server")
    patches = {src.stem: build_rel_patch(binary, src, d)
               for src in (EXAMPLE / "patches" / "fix_parse.c", EXAMPLE / "patches" / "fix_parse_v2.c")}
    (d / "other").mkdir()
    other = build_program(server_sources(), d / "other" / "server", cflags=["-O1"])
    other_fix = build_rel_patch(other, EXAMPLE / "patches" / "fix_parse.c", d / "other")
    return ServerBuild(binary, patches, other, other_fix)


def prefork_build(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tests/programs/fleet_prefork.c and its patch."""
    d = factory.mktemp("prefork")
    prog = build_program([PROGRAMS / "fleet_prefork.c"], d / "fleet_prefork")
    return prog, build_rel_patch(prog, PROGRAMS / "fleet_prefork_patch.c", d)


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without fentry settings (the sockets go where a user's do)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FENTRY_") and k not in ("XDG_RUNTIME_DIR", "LD_PRELOAD")}
    env.update(extra)
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of `text`, one a line (what --json prints for several processes)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Prefork:
    """A running fleet_prefork: the master, its workers, what each worker computes now."""

    def __init__(self, binary: Path, workers: int, state: Path, env: dict[str, str] | None = None) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.state = state
        self.proc = subprocess.Popen([str(binary), str(workers), str(state)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env or clean_env(), bufsize=0,
                                     cwd=binary.parent)
        self._buf = b""
        try:
            self.port = int(self._line().split()[1])
            self.workers = [int(self._line().split()[1]) for _ in range(workers)]
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        return [self.pid, *self.workers]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, "fleet_prefork printed nothing"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                assert chunk, f"fleet_prefork exited with status {self.proc.wait()}"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def next_worker(self) -> int:
        """The pid of the worker the master forks next (after one died)."""
        return int(self._line().split()[1])

    def value(self, pid: int) -> int | None:
        """What worker `pid` computed last (fleet_answer(1)), None before its first record."""
        try:
            return int((self.state / str(pid)).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_value(self, pid: int, want: int) -> None:
        """Until worker `pid` computes `want` (it records every 10 ms; TIMEOUT bounds a hang)."""
        deadline = time.monotonic() + TIMEOUT
        while (got := self.value(pid)) != want:
            assert time.monotonic() < deadline, f"worker {pid} computes {got}, not {want}"
            time.sleep(0.02)

    def ask(self) -> tuple[int, int]:
        """One request on the shared socket: (the pid of the worker that served it, its value)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as s:
            s.sendall(b"v\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(64)
                assert chunk, f"the server closed the connection; got {data!r}"
                data += chunk
        pid, value = data.split()
        return int(pid), int(value)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM to the master, which stops its workers (orphaned ones exit by themselves)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode
