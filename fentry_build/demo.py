"""``fentry-build demo``: build the server example, fix its bug in the running process, revert it.

Everything the demo does is what a user types (each command is shown as ``$ ...``): it
copies ``examples/server`` out of the installed package into a temporary folder, runs
meson-init, Meson and the server, and talks to the server over TCP.  Whatever happens -
a failed step, Ctrl-C, SIGTERM - the server is stopped and the folder removed.
"""

from __future__ import annotations

import importlib.util
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from fentry_build import paths
from fentry_build.build import meson_init
from fentry_build.client import control
from fentry_build.errors import FentryError

EXAMPLE = "server"
PATCH = "fix_parse"

# parse_request() of examples/server/parser.c refuses a SUM of exactly 8 numbers.
GOOD_REQUEST, GOOD_ANSWER = "SUM 1 2 3", "OK 6"
BUG_REQUEST = "SUM 1 2 3 4 5 6 7 8"
BUGGY_ANSWER = "ERR too many numbers (at most 8)"
FIXED_ANSWER = "OK 36"

SETUP_TIMEOUT = 120.0
COMPILE_TIMEOUT = 600.0
START_TIMEOUT = 10.0
REQUEST_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
CLIENT_WARMUP = 0.2  # seconds the client runs before the apply, and after it
STEPS = 9


# ---- narration ------------------------------------------------------------------------


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, title: str) -> None:
    _say(f"\n[{n}/{STEPS}] {title}")


def _shell(command: str) -> None:
    _say(f"  $ {command}")


def _indented(text: str) -> None:
    for line in text.splitlines():
        _say(f"    {line}")


# ---- running Meson ----------------------------------------------------------------------


def meson_command() -> list[str]:
    """Meson of this interpreter's environment, so that the generator runs under it too.

    Meson's ``find_installation()`` (shim/meson.build) picks the Python running Meson.
    """
    beside = Path(sys.executable).parent / "meson"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    if importlib.util.find_spec("mesonbuild") is not None:
        return [sys.executable, "-m", "mesonbuild.mesonmain"]
    raise FentryError(f"Meson is not installed for {sys.executable}; {sys.executable} -m pip install meson ninja")


def _tool_env() -> dict[str, str]:
    """Our environment, with this interpreter's bin first (ninja) and fentry_build importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    package_parent = Path(__file__).resolve().parent.parent
    if paths.data_dir() == package_parent:  # a source checkout, maybe found through the cwd
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(package_parent), env.get("PYTHONPATH", "")] if p)
    return env


def _last_lines(text: str, n: int = 15) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:] if line.strip())


def _meson(args: list[str], cwd: Path, timeout: float) -> None:
    _shell(" ".join(["meson", *args]))
    started = time.monotonic()
    try:
        proc = subprocess.run([*meson_command(), *args], cwd=cwd, env=_tool_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FentryError(f"meson {' '.join(args)} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        raise FentryError(f"meson {' '.join(args)} failed (exit {proc.returncode}): "
                          f"{_last_lines(proc.stdout + proc.stderr)}")
    _say(f"    (done in {time.monotonic() - started:.1f} s)")


# ---- the server -------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


def _read_first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd, data = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise FentryError(f"the server printed no 'listening on' line within {timeout:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise FentryError(f"the server exited (status {proc.wait()}) before listening")
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def start_server(program: Path, cwd: Path) -> Server:
    """Start ``program 0`` and read the port it prints: ``listening on 127.0.0.1:<port>``."""
    proc = subprocess.Popen([str(program), "0"], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE)
    try:
        line = _read_first_line(proc, START_TIMEOUT)
        head, _, port = line.rpartition(":")
        if head != "listening on 127.0.0.1" or not port.isdigit():
            raise FentryError(f"the server printed {line!r}, not 'listening on 127.0.0.1:<port>'")
    except BaseException:
        stop_server(proc)
        raise
    return Server(proc, int(port))


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def ask(port: int, request: str, timeout: float = REQUEST_TIMEOUT) -> str:
    """One request on a new connection; the server's one-line answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request.encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line.endswith(b"\n"):
        raise FentryError(f"the server closed the connection without answering {request!r}")
    return line.decode(errors="replace").rstrip("\n")


def _conversation(port: int, request: str, note: str = "") -> str:
    answer = ask(port, request)
    _say(f"  > {request}")
    _say(f"  < {answer}" + (f"      <- {note}" if note else ""))
    return answer


def _expect(answer: str, wanted: str, what: str) -> None:
    if answer != wanted:
        raise FentryError(f"{what}: the server answered {answer!r}, expected {wanted!r}")


# ---- a client that keeps asking while the patch goes in ------------------------------------


@dataclass
class Tally:
    requests: int = 0
    old: int = 0           # the buggy answer
    new: int = 0           # the fixed answer
    failed: int = 0        # no answer, or another one
    old_after_apply: int = 0  # buggy answers to requests sent after apply() returned
    first_failure: str = ""


class BusyClient:
    """One connection sending BUG_REQUEST back to back until stopped, counting answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tally = Tally()
        self.applied = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> Tally:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT + 1)
        return self.tally

    def _fail(self, why: str) -> None:
        self.tally.failed += 1
        self.tally.first_failure = self.tally.first_failure or why

    def _run(self) -> None:
        t = self.tally
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=REQUEST_TIMEOUT) as s, \
                    s.makefile("rwb") as f:
                while not self._stop.is_set():
                    after_apply = self.applied.is_set()
                    f.write(BUG_REQUEST.encode() + b"\n")
                    f.flush()
                    answer = f.readline().decode(errors="replace").rstrip("\n")
                    t.requests += 1
                    if answer == BUGGY_ANSWER:
                        t.old += 1
                        t.old_after_apply += after_apply
                    elif answer == FIXED_ANSWER:
                        t.new += 1
                    else:
                        self._fail(f"unexpected answer {answer!r}")
        except OSError as e:
            self._fail(f"connection error: {e}")


# ---- the steps ------------------------------------------------------------------------------


def _copy_example(work: Path) -> Path:
    src = paths.examples_dir() / EXAMPLE
    if not (src / "meson.build").is_file():
        raise FentryError(f"the example {src} is missing; reinstall fentry_build")
    project = work / EXAMPLE
    _shell(f"cp -r {src} {project}")
    shutil.copytree(src, project, ignore=shutil.ignore_patterns("build*", "subprojects"))
    _shell(f"cd {project}")
    return project


def _build(project: Path) -> Path:
    _shell("fentry-build meson-init")
    result = meson_init.meson_init(project)
    _say(f"    wrote subprojects/fentry and subprojects/fentry.wrap ({len(result.written)} files)")
    _meson(["setup", "build"], project, SETUP_TIMEOUT)
    _meson(["compile", "-C", "build"], project, COMPILE_TIMEOUT)
    program = project / "build" / EXAMPLE
    if not program.is_file():
        raise FentryError(f"meson compile did not produce {program}")
    return program


def _show_bug(port: int, what: str) -> None:
    _expect(_conversation(port, GOOD_REQUEST), GOOD_ANSWER, what)
    answer = _conversation(port, BUG_REQUEST, "the bug: 8 numbers are allowed")
    _expect(answer, BUGGY_ANSWER, what)


def _apply_under_load(server: Server, patch: Path) -> Tally:
    client = BusyClient(server.port)
    client.start()
    try:
        time.sleep(CLIENT_WARMUP)
        _shell(f"fentry-build apply --pid {server.pid} build/{patch.name}")
        _indented(control.format_apply(control.apply(server.pid, patch)))
        client.applied.set()
        time.sleep(CLIENT_WARMUP)
    finally:
        tally = client.stop()
    _say(f"    a client sent {tally.requests} requests meanwhile on one connection: "
         f"{tally.failed} failed, {tally.old} answered before the fix took effect, "
         f"{tally.new} after")
    if tally.failed:
        raise FentryError(f"{tally.failed} requests failed during the apply "
                          f"(first: {tally.first_failure})")
    if tally.old_after_apply or tally.new == 0:
        raise FentryError("the fix did not take effect for the client's connection")
    return tally


def _live_patch(project: Path, server: Server) -> None:
    _step(6, f"Build the fix, patches/{PATCH}.c, against the program that is running")
    _meson(["compile", "-C", "build", "patches"], project, COMPILE_TIMEOUT)
    patch = project / "build" / f"{PATCH}.so"
    if not patch.is_file():
        raise FentryError(f"meson compile patches did not produce {patch}")

    _step(7, f"Apply it to process {server.pid} while a client keeps sending requests")
    _apply_under_load(server, patch)
    answer = _conversation(server.port, BUG_REQUEST, f"fixed, same process {server.pid}")
    _expect(answer, FIXED_ANSWER, "after apply")
    _expect(_conversation(server.port, GOOD_REQUEST), GOOD_ANSWER, "after apply")
    _shell(f"fentry-build list --pid {server.pid}")
    _indented(control.format_list(control.list_patches(server.pid)))

    _step(8, "Revert it: the original parse_request() runs again")
    _shell(f"fentry-build revert --pid {server.pid} {PATCH}")
    _indented(control.format_revert(control.revert(server.pid, PATCH)))
    answer = _conversation(server.port, BUG_REQUEST, "the bug is back")
    _expect(answer, BUGGY_ANSWER, "after revert")


def _demo(work: Path, servers: list[Server]) -> None:
    _say("fentry-build demo: fix a bug in a running server without restarting it")
    _step(1, "Copy the example server out of the fentry_build package")
    project = _copy_example(work)

    _step(2, "Build it: its functions get a __fentry__ call (gcc -pg -mfentry) and the shim")
    program = _build(project)

    _step(3, "Start the server")
    _shell(f"build/{EXAMPLE} 0 &")
    server = start_server(program, project)
    servers.append(server)
    _say(f"    listening on 127.0.0.1:{server.port}   (pid {server.pid})")

    _step(4, "Ask it a few things: parse_request() in parser.c has an off-by-one")
    _show_bug(server.port, "before the patch")

    _step(5, f"Its control channel: process {server.pid} runs the build we just made")
    _shell(f"fentry-build status --pid {server.pid}")
    _indented(control.format_status(control.status(server.pid)))

    _live_patch(project, server)

    _step(9, "Stop the server")
    _shell(f"kill {server.pid}")
    status = stop_server(server.proc)
    servers.remove(server)
    if status != 0:
        raise FentryError(f"the server exited with status {status} on SIGTERM, not 0")
    _say("    it exited cleanly (status 0)")


# ---- cleaning up whatever happens -------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so that `finally` cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(keep: bool = False) -> int:
    """Run the narrated demo; 0 on success, FentryError when a step fails."""
    work = Path(tempfile.mkdtemp(prefix="fentry-demo-"))
    servers: list[Server] = []
    with _sigterm_interrupts():
        try:
            _demo(work, servers)
        finally:
            for server in servers:
                stop_server(server.proc)
            if keep:
                _say(f"\nThe project stays in {work / EXAMPLE} (--keep).")
            else:
                shutil.rmtree(work, ignore_errors=True)
    _say("\nDone: the same process answered wrongly, then correctly, then wrongly again, "
         "and no request failed.")
    return 0


__all__ = ["run_demo", "meson_command", "start_server", "stop_server", "ask"]
