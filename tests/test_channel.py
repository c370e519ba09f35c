"""The CLI finds the socket a process really serves and trusts it only after checking it
(docs/security.md, "What the client checks"): real server, real CLI, another user (uid
nobody through setpriv) planting sockets, a setuid program, a private mount namespace and
a pid namespace (unshare, as root), and a request that expires while the process is busy.

Each attack ends in a one-line refusal, exit status 1, nothing sent to the planted socket
and the server unchanged - never a false "applied".
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fentry_build.client import control

from support.builds import ServerBuild
from support.cli import NOBODY, assert_one_error_line, cli
from support.servers import (
    BUG_REQUEST,
    BUGGY,
    FIXED,
    TIMEOUT,
    Server,
    ask,
    assert_buggy,
    assert_stops_cleanly,
    start_server,
)

needs_root = pytest.mark.needs_root
needs_nobody = pytest.mark.needs_nobody
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FENTRY_") and k not in ("XDG_RUNTIME_DIR", "LD_PRELOAD")}
    env.update(extra)
    return env


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder in /tmp that uid nobody may read and traverse."""
    d = Path(tempfile.mkdtemp(prefix="fchan-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, f"{proc.args} printed nothing"
    return proc.stdout.readline().decode().strip()


class Running:
    """A server started some other way than support.servers.start_server: its pid and port."""

    def __init__(self, proc: subprocess.Popen[bytes], pid: int | None = None) -> None:
        self.proc = proc
        line = first_line(proc)
        assert line.startswith("listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        self.pid = pid if pid is not None else proc.pid

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)


@pytest.fixture
def running() -> Iterator[list[Running]]:
    servers: list[Running] = []
    yield servers
    for s in servers:
        s.kill()


# A socket another user plants where a careless client would look: it answers every
# request with "applied" and writes what it received to stdout (it must stay empty).
FAKE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
print("planted", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    if data:
        print("received", data, flush=True)
    try:
        c.sendall(b'{"ok": true, "name": "fix_parse", "sha256": null, "functions": 1}\n')
    except OSError:
        pass
    c.close()
"""


def plant(path: Path) -> subprocess.Popen[str]:
    fake = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c", FAKE, str(path)],
                            stdout=subprocess.PIPE, text=True, cwd="/")
    assert fake.stdout is not None and fake.stdout.readline().strip() == "planted"
    return fake


def received(fake: subprocess.Popen[str]) -> str:
    fake.kill()
    out, _ = fake.communicate(timeout=TIMEOUT)
    return out


def assert_still_buggy(port: int) -> None:
    assert ask(port, BUG_REQUEST) == BUGGY


# ---- another user squats the folder -------------------------------------------------------


@needs_nobody
def test_a_socket_planted_in_a_folder_the_process_refused_is_never_used(
        built: ServerBuild, running: list[Running], public: Path) -> None:
    # The service starts without a usable folder of its own: another user made the default
    # folder first ($XDG_RUNTIME_DIR/fentry here, /tmp/fentry-0 for root services without
    # XDG_RUNTIME_DIR), so the shim refuses it and runs without a channel.  That user then
    # plants <pid>.sock there.  The client used to compute the path from the process's
    # environment and report "applied" from the planted socket.
    xdg = public / "xdg"
    xdg.mkdir()
    xdg.chmod(0o1777)
    squat = xdg / "fentry"
    subprocess.run([*AS_NOBODY, "mkdir", "-m", "777", str(squat)], check=True)
    proc = subprocess.Popen([str(built.binary), "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env(XDG_RUNTIME_DIR=str(xdg)), cwd="/")
    srv = Running(proc)
    running.append(srv)
    reason = (f"{squat} belongs to uid {NOBODY}, not to this process's uid 0; remove it or set "
              "FENTRY_RUNTIME_DIR to a folder of uid 0")
    fake = plant(squat / f"{srv.pid}.sock")
    try:
        for verb in (["apply", "--pid", str(srv.pid), str(built.patches["fix_parse"])],
                     ["status", "--pid", str(srv.pid)], ["list", "--pid", str(srv.pid)]):
            result = cli(*verb)
            assert_one_error_line(result, f"process {srv.pid} has no fentry control channel: "
                                          f"{reason}")
            assert result.stdout == ""
    finally:
        assert received(fake) == ""
    assert_still_buggy(srv.port)


# ---- a setuid program ----------------------------------------------------------------------


SETUID_ATTACK = r"""
import os, socket, subprocess, sys
prog, folder = sys.argv[1], sys.argv[2]
env = {"PATH": "/usr/bin:/bin", "FENTRY_RUNTIME_DIR": folder}
p = subprocess.Popen([prog, "0"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     cwd="/")
line = p.stdout.readline().decode().strip()
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(folder, f"{p.pid}.sock"))
s.listen(8)
print(p.pid, line, flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    if data:
        print("received", data, flush=True)
    try:
        c.sendall(b'{"ok": true, "name": "fix_parse", "sha256": null, "functions": 1}\n')
    except OSError:
        pass
    c.close()
"""


@needs_nobody
def test_a_setuid_program_is_reached_at_the_socket_it_serves_not_the_users_folder(
        built: ServerBuild, public: Path) -> None:
    # A user runs a setuid-root program with FENTRY_RUNTIME_DIR pointing at a folder of
    # theirs, where they listen as <pid>.sock.  The shim ignores the variable (AT_SECURE),
    # but /proc/PID/environ shows it: the client must not follow it.
    prog = public / "server"
    shutil.copyfile(built.binary, prog)
    os.chown(prog, 0, 0)
    prog.chmod(0o4755)
    theirs = public / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    attack = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c", SETUID_ATTACK, str(prog),
                               str(theirs)], stdout=subprocess.PIPE, text=True, cwd="/")
    pid = 0
    try:
        assert attack.stdout is not None
        first = attack.stdout.readline().split()
        pid, port = int(first[0]), int(first[-1].rsplit(":", 1)[1])
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()
        if uids[1] != "0":
            pytest.skip(f"{public} does not honour setuid (nosuid?)")
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert f"FENTRY_RUNTIME_DIR={theirs}".encode() in environ
        assert ask(port, BUG_REQUEST) == BUGGY
        result = cli("apply", "--pid", str(pid), str(built.patches["fix_parse"]))
        assert result.returncode == 0, result.stderr
        assert ask(port, BUG_REQUEST) == FIXED  # the real process has the patch
        assert control.socket_path(pid).parent == Path("/tmp/fentry-0")
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        attack.kill()
        out, _ = attack.communicate(timeout=TIMEOUT)
    assert "received" not in out, out  # nothing ever reached the user's socket


# ---- namespaces ----------------------------------------------------------------------------


def _require_unshare() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")


def _apply_list_revert(pid: int, srv: Running, patch: Path) -> dict[str, Any]:
    assert_still_buggy(srv.port)
    result = cli("apply", "--pid", str(pid), str(patch))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "applied fix_parse (1 function replaced)"
    assert ask(srv.port, BUG_REQUEST) == FIXED
    listed = json.loads(cli("list", "--pid", str(pid), "--json").stdout)
    assert [p["name"] for p in listed["patches"]] == ["fix_parse"]
    assert cli("revert", "--pid", str(pid), "fix_parse").returncode == 0
    assert_still_buggy(srv.port)
    status: dict[str, Any] = json.loads(cli("status", "--pid", str(pid), "--json").stdout)
    return status


@needs_root
def test_a_process_in_a_private_mount_namespace_is_reached_through_its_root(
        built: ServerBuild, running: list[Running]) -> None:
    # Like systemd's PrivateTmp=: the folder the process uses is a tmpfs only it sees; the
    # same path from outside is an empty folder.
    _require_unshare()
    rundir = Path(tempfile.mkdtemp(prefix="fmnt-", dir="/tmp"))
    try:
        script = f"mount -t tmpfs -o mode=0700 tmpfs {rundir} && exec {built.binary} 0"
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env=clean_env(FENTRY_RUNTIME_DIR=str(rundir)), cwd="/")
        srv = Running(proc)
        running.append(srv)
        assert list(rundir.iterdir()) == []  # nothing to see from here
        assert control.socket_path(srv.pid) == Path(f"/proc/{srv.pid}/root{rundir}/{srv.pid}.sock")
        status = _apply_list_revert(srv.pid, srv, built.patches["fix_parse"])
        assert status["pid"] == srv.pid
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _child_of(pid: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"process {pid} started no child")


@needs_root
def test_a_process_in_a_pid_namespace_is_reached_by_its_pid_here(
        built: ServerBuild, running: list[Running], public: Path) -> None:
    # Inside its namespace the server is pid 1 and names its socket 1.sock; we know it by
    # another pid.  The peer's credentials give us that pid.
    _require_unshare()
    rundir = public / "run"
    rundir.mkdir(mode=0o700)
    proc = subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", str(built.binary), "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            env=clean_env(FENTRY_RUNTIME_DIR=str(rundir)), cwd="/")
    pid = _child_of(proc.pid)
    srv = Running(proc, pid)
    running.append(srv)
    nspid = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].splitlines()[0].split()
    assert nspid == [str(pid), "1"]
    assert (rundir / "1.sock").exists() and not (rundir / f"{pid}.sock").exists()
    status = _apply_list_revert(pid, srv, built.patches["fix_parse"])
    assert status["pid"] == 1  # its own pid, as it sees it


# ---- a request the process could not come to in time ------------------------------------


def test_a_request_the_process_took_too_late_expires_and_is_never_carried_out(
        built: ServerBuild, started: list[Server]) -> None:
    # The control thread is held for 3 s by a pre-patch callback that hangs (the first
    # apply).  A second apply, with a 1 s timeout, waits in the socket: the client gives up
    # saying that it expired, and when the process comes to it, it refuses it ("expired")
    # instead of applying the patch late.  The first client waits past its own 1 s: the
    # process had taken its request, so its real answer counts.
    srv = start_server(built.binary, "dispatch", {"FENTRY_CALLBACK_TIMEOUT_MS": "3000"})
    started.append(srv)
    threads_before = len(list(Path(f"/proc/{srv.pid}/task").iterdir()))
    first: dict[str, subprocess.CompletedProcess[str]] = {}
    hang = threading.Thread(target=lambda: first.setdefault("r", cli(
        "apply", "--pid", str(srv.pid), "--timeout", "1", str(built.patches["rel_hang_patch"]))))
    hang.start()
    deadline = time.monotonic() + 60
    while len(list(Path(f"/proc/{srv.pid}/task").iterdir())) == threads_before:
        assert time.monotonic() < deadline, "the hanging callback never started"
        time.sleep(0.01)  # the callback's thread exists: the control thread is held
    second = cli("apply", "--pid", str(srv.pid), "--timeout", "1", str(built.patches["fix_parse"]))
    assert_one_error_line(second, f"process {srv.pid} did not take the request within 1 s; it "
                                  "expired and will not be carried out later")
    hang.join(timeout=120)
    assert_one_error_line(first["r"], "its pre-patch callback did not return within 3000 ms")
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while len(entries) < 2:
        assert time.monotonic() < deadline, entries
        entries = control.history(srv.pid)["history"]
    assert [(e["op"], e["path"], e.get("code")) for e in entries] == [
        ("load", str(built.patches["rel_hang_patch"]), "callback_refused"),
        ("load", str(built.patches["fix_parse"]), "expired")]
    assert control.list_patches(srv.pid)["patches"] == []
    assert_buggy(srv)
    assert_stops_cleanly(srv)


def test_status_of_a_process_without_a_channel_says_why(
        built: ServerBuild, running: list[Running]) -> None:
    proc = subprocess.Popen([str(built.binary), "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, env=clean_env(FENTRY_CONTROL="0"), cwd="/")
    srv = Running(proc)
    running.append(srv)
    result = cli("status", "--pid", str(srv.pid))
    assert_one_error_line(result, f"process {srv.pid} has no fentry control channel: "
                                  "FENTRY_CONTROL=0 (the program runs without a channel)")
