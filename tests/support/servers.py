"""The test programs that serve requests, started and talked to the same way everywhere.

- Server: examples/server (4 worker threads, a line protocol, the bug in parse_request
  that patches/fix_parse.c fixes), on a TCP port of 127.0.0.1;
- ModesServer: tests/programs/modes_server.c, the program of the preload and attach
  tests (busy threads calling compute(), one-line requests).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fentry_build.client import control

from support.cli import AS_NOBODY

MODES = ["jump", "dispatch"]
BUSY = 8
TIMEOUT = 10.0  # seconds for one request, a start, a stop

PING = ("PING", "PONG")
SMALL_SUM = ("SUM 1 2 3", "OK 6")
SEVEN = ("SUM 1 2 3 4 5 6 7", "OK 28")
BUG_REQUEST = "SUM 1 2 3 4 5 6 7 8"     # exactly MAX_NUMBERS numbers
BUGGY = "ERR too many numbers (at most 8)"
FIXED = "OK 36"
NINE = ("SUM 1 2 3 4 5 6 7 8 9", BUGGY)  # too many, before and after the fix
LOWER = "sum 1 2"                         # only fix_parse_v2 reads lower case
LOWER_OLD = "ERR unknown command 'sum' (try PING, SUM or QUIT)"
LOWER_V2 = "OK 3"
REQUEST_MAX = 1024                        # server.c


# ---- the server example -----------------------------------------------------------------


def _server_env(mode: str = "") -> dict[str, str]:
    """Our environment without fentry settings: the control socket goes where a user's does.

    `mode` "dispatch" sets FENTRY_MODE=dispatch; "" is the default (jump mode where the
    program's code can be rewritten).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FENTRY_") and k != "XDG_RUNTIME_DIR"}
    if mode:
        env["FENTRY_MODE"] = mode
    return env


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    binary: Path
    mode: str
    stopped: tuple[int, str] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send `sig`; its exit status and what it printed after the listening line."""
        if self.stopped is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                out, _ = self.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            self.stopped = (self.proc.returncode, out.decode(errors="replace"))
        return self.stopped


def _first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    fd, data = proc.stdout.fileno(), b""
    deadline = time.monotonic() + TIMEOUT
    while b"\n" not in data:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], "the server printed nothing"
        chunk = os.read(fd, 4096)
        assert chunk, f"the server exited with status {proc.wait()} before listening"
        data += chunk
    return data.split(b"\n", 1)[0].decode()


def start(binary: Path, mode: str = "") -> Server:
    proc = subprocess.Popen([str(binary), "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            env=_server_env(mode), cwd=binary.parent)
    try:
        line = _first_line(proc)
        assert line.startswith("listening on 127.0.0.1:"), line
        return Server(proc, int(line.rsplit(":", 1)[1]), binary, mode)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_line(s: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"the server closed the connection; got {data!r}"
        data += chunk
    return data[:-1].decode(errors="replace")


def ask(port: int, request: str | bytes) -> str:
    raw = request.encode() if isinstance(request, str) else request
    with connect(port) as s:
        s.sendall(raw + b"\n")
        return read_line(s)


def assert_buggy(srv: Server) -> None:
    assert srv.alive()
    for request, answer in (PING, SMALL_SUM, SEVEN, NINE, (BUG_REQUEST, BUGGY),
                            (LOWER, LOWER_OLD)):
        assert ask(srv.port, request) == answer, request


def assert_fixed(srv: Server) -> None:
    assert srv.alive()
    for request, answer in (PING, SMALL_SUM, SEVEN, NINE, (BUG_REQUEST, FIXED),
                            (LOWER, LOWER_OLD)):
        assert ask(srv.port, request) == answer, request


def assert_v2(srv: Server) -> None:
    assert srv.alive()
    for request, answer in (PING, SMALL_SUM, NINE, (BUG_REQUEST, FIXED), (LOWER, LOWER_V2),
                            ("Ping", "PONG")):
        assert ask(srv.port, request) == answer, request


def assert_no_patches(srv: Server) -> None:
    assert control.list_patches(srv.pid)["patches"] == []


def start_server(binary: Path, mode: str, extra_env: dict[str, str] | None = None) -> Server:
    """The server in `mode` ("jump": the default, no FENTRY_MODE; "dispatch"), checked."""
    env = _server_env("dispatch" if mode == "dispatch" else "")
    env.update(extra_env or {})
    proc = subprocess.Popen([str(binary), "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            env=env, cwd=binary.parent)
    try:
        line = _first_line(proc)
        assert line.startswith("listening on 127.0.0.1:"), line
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    srv = Server(proc, int(line.rsplit(":", 1)[1]), binary, mode)
    status = control.status(srv.pid)
    if status["mode"] != mode:
        srv.stop()
        if mode == "jump":
            pytest.skip(f"jump mode is not available on this machine: {status['mode_reason']}")
        raise AssertionError(f"asked for {mode} mode, got {status}")
    return srv


def assert_stops_cleanly(srv: Server) -> None:
    """It was alive all along: SIGTERM makes it exit 0 with its one line."""
    assert srv.alive(), f"the server died: status {srv.proc.returncode}"
    assert srv.stop() == (0, "stopped (SIGTERM)\n")


def patch_states(srv: Server) -> dict[str, str]:
    return {p["name"]: p["state"] for p in control.list_patches(srv.pid)["patches"]}


def assert_coherent(srv: Server) -> str:
    """list, status and the server's behaviour agree; fix_parse's state ("none" if not loaded)."""
    states = patch_states(srv)
    status = control.status(srv.pid)
    assert status["patches_loaded"] == len(states)
    assert status["patches_active"] == sum(s == "active" for s in states.values())
    assert set(states) <= {"fix_parse"}, states
    state = states.get("fix_parse", "none")
    (assert_fixed if state == "active" else assert_buggy)(srv)
    return state


def wait_until_quiet(srv: Server, seconds: float = 5.0) -> None:
    """Until `list` stops changing: requests of clients that left may still be queued."""
    deadline = time.monotonic() + seconds
    last, same = None, 0
    while same < 3:
        now = control.list_patches(srv.pid)["patches"]
        same = same + 1 if now == last else 0
        last = now
        assert time.monotonic() < deadline, "the patch list kept changing"
        time.sleep(0.1)


def raw_connect(sock_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    for _ in range(1000):
        try:
            s.connect(str(sock_path))
            return s
        except BlockingIOError:  # a full backlog: the control thread is busy
            time.sleep(0.005)
    raise AssertionError(f"{sock_path}: the backlog stayed full")


def figures(test: str, **values: Any) -> None:
    """One line of figures in the test output (pytest -s), for docs/security.md."""
    print(f"\n[figures] {test}: " + " ".join(f"{k}={v}" for k, v in values.items()))


# ---- modes_server ---------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """One line of the process's unbuffered stdout (bufsize=0: select sees every byte)."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()  # raw: reads up to the newline, no further
            if not line:
                break
            return line.decode().strip()
        if proc.poll() is not None:
            break
    raise AssertionError(f"{proc.args} printed nothing (exit {proc.poll()})")


class ModesServer:
    """A running modes_server (tests/programs/modes_server.c): its pid and port, one-line requests."""

    def __init__(self, binary: Path, rundir: Path, *, busy: int = BUSY,
                 env: dict[str, str] | None = None, as_nobody: bool = False) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_") and k != "LD_PRELOAD"}
        full["FENTRY_RUNTIME_DIR"] = str(rundir)
        full.update(env or {})
        prefix = AS_NOBODY if as_nobody else []
        self.proc = subprocess.Popen([*prefix, str(binary), str(busy)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0, env=full, cwd=rundir)
        deadline = time.monotonic() + 30
        self.port = int(_read_line(self.proc, deadline).split()[1])
        self.pid = int(_read_line(self.proc, deadline).split()[1])
        assert self.pid == self.proc.pid
        self.busy = busy

    def connect(self) -> tuple[socket.socket, Any]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        return s, s.makefile("rw")

    def ask(self, line: str) -> str:
        s, f = self.connect()
        with s, f:
            f.write(line + "\n")
            f.flush()
            return str(f.readline().strip())

    def compute(self, x: int) -> int:
        return int(self.ask(f"c {x}"))

    def stats(self) -> tuple[list[tuple[int, int]], int]:
        """[(calls, last result) per busy thread], and how many wrong results were seen."""
        *threads, bad = self.ask("s").split()
        return [tuple(map(int, t.split(":"))) for t in threads], int(bad.split("=")[1])  # type: ignore[misc]

    def wait_busy_results(self, factor: int, timeout: float = 20.0) -> None:
        """Until every busy thread's latest compute(i + 1) is factor * (i + 1)."""
        deadline = time.monotonic() + timeout
        while True:
            threads, bad = self.stats()
            assert bad == 0, f"busy threads saw {bad} wrong results"
            if all(last == factor * (i + 1) for i, (_, last) in enumerate(threads)):
                return
            assert time.monotonic() < deadline, f"busy threads still return {threads}"
            time.sleep(0.05)

    def wait_all_threads_advance(self, timeout: float = 30.0) -> None:
        """Until every busy thread has made more calls than now: all of them are alive and
        none is stuck.  `timeout` bounds a hang; it is no speed requirement."""
        before = [calls for calls, _ in self.stats()[0]]
        deadline = time.monotonic() + timeout
        while True:
            threads, bad = self.stats()
            assert bad == 0, f"busy threads saw {bad} wrong results"
            if all(calls > b for (calls, _), b in zip(threads, before, strict=True)):
                return
            assert time.monotonic() < deadline, f"busy threads stopped: {before} -> {threads}"
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (e.g. TracerPid, FDSize)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out
