"""The server example end to end: a running multi-threaded server is fixed, listed, reverted.

Everything is real: Meson, Ninja, gcc, the generator, the shim, the server's TCP sockets,
the control socket, other processes and another uid.  The example is built once per
module (as a user builds it: copy, meson-init, meson); every test starts its own server.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fentry_build.binary import check
from fentry_build.client import control
from fentry_build.errors import FentryError

from support.builds import copy_example, meson, setup_and_compile
from support.cli import CLI, NOBODY, assert_one_error_line, cli, python_for_nobody
from support.nobody import readable_package_parent
from support.servers import (
    BUG_REQUEST,
    BUGGY,
    FIXED,
    REQUEST_MAX,
    SMALL_SUM,
    TIMEOUT,
    Server,
    _server_env,
    ask,
    assert_buggy,
    assert_fixed,
    assert_no_patches,
    assert_v2,
    connect,
    read_line,
    start,
)

pytestmark = [pytest.mark.slow]

# ---- building -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/server built with its patches, the way a user builds it."""
    proj = copy_example("server", tmp_path_factory.mktemp("server") / "server")
    setup_and_compile(proj)
    meson("compile", "-C", "build", "patches", cwd=proj)
    return proj


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same program built again after a small source change: another build-id."""
    proj = copy_example("server", tmp_path_factory.mktemp("server2") / "server")
    src = proj / "server.c"
    text = src.read_text()
    assert "#define IDLE_MS 60000" in text
    src.write_text(text.replace("#define IDLE_MS 60000", "#define IDLE_MS 30000"))
    setup_and_compile(proj)
    return proj


def program(proj: Path) -> Path:
    return proj / "build" / "server"


def patch(proj: Path, name: str = "fix_parse") -> Path:
    return proj / "build" / f"{name}.so"


# ---- running the server -----------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture(params=["", "dispatch"], ids=["default-mode", "dispatch-mode"])
def server(request: pytest.FixtureRequest, project: Path, servers: list[Server]) -> Server:
    """A server of the module's build, in the shim's default mode and in dispatch mode."""
    servers.append(start(program(project), request.param))
    return servers[-1]


# ---- talking to it ----------------------------------------------------------------------


# ---- the bug ------------------------------------------------------------------------------


def test_server_has_the_bug(server: Server) -> None:
    assert_buggy(server)
    assert ask(server.port, "SUM 9223372036854775807 1") == "ERR sum out of range"
    assert ask(server.port, "SUM 1 x") == "ERR not a number: 'x'"
    assert ask(server.port, "") == "ERR empty request"
    with connect(server.port) as s:  # several requests on one connection, CRLF accepted
        s.sendall(b"PING\r\nSUM 4 5\nQUIT\nPING\n")
        assert [read_line(s) for _ in range(3)] == ["PONG", "OK 9", "BYE"]
        assert s.recv(1) == b""  # QUIT closed it


def test_parse_request_is_a_function_of_its_own(project: Path) -> None:
    """Not inlined into its caller: the function a patch replaces is the one that runs."""
    report = check.check_binary(program(project))
    names = {f["name"] for f in report["functions"]}
    assert {"parse_request", "execute_request", "serve_client"} <= names


def test_sigterm_and_sigint_stop_it_cleanly(project: Path, servers: list[Server]) -> None:
    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        srv = start(program(project))
        servers.append(srv)
        sock_path = control.socket_path(srv.pid)
        assert sock_path.exists()
        with connect(srv.port) as idle:  # a client in the middle of a connection
            idle.sendall(b"SUM 1")
            time.sleep(0.1)
            assert srv.stop(sig) == (0, f"stopped ({name})\n")
        assert not sock_path.exists()


# ---- fixing it live --------------------------------------------------------------------------


@dataclass
class Client:
    """Sends `request` until stopped; each answer with whether apply had returned before."""

    port: int
    request: str
    reconnect: bool = False  # a new connection per request (exercises accept meanwhile)
    answers: list[tuple[bool, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    applied: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            if self.reconnect:
                while not self.done.is_set():
                    after = self.applied.is_set()
                    self.answers.append((after, ask(self.port, self.request)))
            else:
                with connect(self.port) as s:
                    while not self.done.is_set():
                        after = self.applied.is_set()
                        s.sendall(self.request.encode() + b"\n")
                        self.answers.append((after, read_line(s)))
        except (OSError, AssertionError) as e:
            self.errors.append(repr(e))


def wait_for_answers(clients: list[Client], *, after: bool, count: int = 3,
                     timeout: float = 30.0) -> None:
    """Until every client has `count` answers from before (or after) the apply returned.  A
    bound on a hang, not a speed: a loaded machine may take seconds where an idle one takes
    milliseconds."""
    deadline = time.monotonic() + timeout
    while not all(sum(a == after for a, _ in list(c.answers)) >= count or c.errors for c in clients):
        assert time.monotonic() < deadline, [len(c.answers) for c in clients]
        time.sleep(0.02)


def test_fix_is_applied_live_while_clients_keep_asking(server: Server, project: Path) -> None:
    clients = [Client(server.port, BUG_REQUEST), Client(server.port, BUG_REQUEST),
               Client(server.port, BUG_REQUEST, reconnect=True),
               Client(server.port, SMALL_SUM[0], reconnect=True)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    wait_for_answers(clients, after=False)
    reply = control.apply(server.pid, patch(project))
    for c in clients:
        c.applied.set()
    wait_for_answers(clients, after=True)
    for c in clients:
        c.done.set()
    for t in threads:
        t.join(timeout=TIMEOUT)
        assert not t.is_alive()

    assert (reply["ok"], reply["name"], reply["functions"]) == (True, "fix_parse", 1)
    for c in clients:
        assert c.errors == [], c.errors  # 0 failed requests
        old, new = (BUGGY, FIXED) if c.request == BUG_REQUEST else (SMALL_SUM[1],) * 2
        assert c.answers and {a for _, a in c.answers} <= {old, new}
        assert {a for after, a in c.answers if after} == {new}  # only the new after apply
        assert any(after for after, _ in c.answers)
    assert any(a == BUGGY for c in clients for _, a in c.answers)  # it was running before
    assert_fixed(server)


def test_list_and_status(server: Server, project: Path) -> None:
    status = control.status(server.pid)
    assert status["pid"] == server.pid
    assert status["program"] == str(program(project).resolve())
    assert status["build_id"] == check.check_binary(program(project))["build_id"]
    if server.mode == "dispatch":
        assert (status["mode"], status["mode_reason"]) == ("dispatch", "FENTRY_MODE=dispatch")
    else:  # jump mode, unless this machine does not let the shim rewrite code (then why)
        assert ((status["mode"], status["mode_reason"]) == ("jump", None)
                or (status["mode"] == "dispatch" and status["mode_reason"]))
    assert (status["patches_active"], status["patches_loaded"]) == (0, 0)
    assert control.format_list(control.list_patches(server.pid)) == "no patches loaded"

    control.apply(server.pid, patch(project))
    (entry,) = control.list_patches(server.pid)["patches"]
    assert entry["name"] == "fix_parse" and entry["state"] == "active"
    assert entry["path"] == str(patch(project))
    assert abs(entry["applied_at"] - time.time()) < 60
    assert [(f["name"], f["in_effect"]) for f in entry["functions"]] == [("parse_request", True)]
    status = control.status(server.pid)
    assert (status["patches_active"], status["patches_loaded"]) == (1, 1)

    listed = cli("list", "--pid", str(server.pid))
    assert listed.returncode == 0 and listed.stderr == ""
    assert listed.stdout.startswith("fix_parse  active  version ")
    assert "  applied " in listed.stdout.splitlines()[0]
    assert "parse_request: in effect" in listed.stdout
    shown = cli("status", "--pid", str(server.pid))
    assert shown.returncode == 0 and shown.stderr == ""
    assert f"pid:       {server.pid}\n" in shown.stdout
    assert f"mode:      {status['mode']}" in shown.stdout
    assert f"build-id:  {status['build_id']}\n" in shown.stdout
    assert "patches:   1 active, 1 loaded" in shown.stdout


def test_revert_restores_the_bug_and_reapply_fixes_it_again(server: Server, project: Path) -> None:
    applied = cli("apply", "--pid", str(server.pid), str(patch(project)))
    assert (applied.returncode, applied.stdout, applied.stderr) == (
        0, "applied fix_parse (1 function replaced)\n", "")
    assert_fixed(server)

    reverted = cli("revert", "--pid", str(server.pid), "fix_parse")
    assert (reverted.returncode, reverted.stdout, reverted.stderr) == (0, "reverted fix_parse\n", "")
    assert_buggy(server)
    (entry,) = control.list_patches(server.pid)["patches"]
    assert entry["state"] == "reverted"
    assert [f["in_effect"] for f in entry["functions"]] == [False]

    again = cli("revert", "--pid", str(server.pid), "fix_parse")
    assert_one_error_line(again, "not applied")
    control.apply(server.pid, patch(project))  # the same file again: re-activated
    assert_fixed(server)


def test_patches_of_one_function_stack(server: Server, project: Path) -> None:
    control.apply(server.pid, patch(project, "fix_parse"))
    assert_fixed(server)
    control.apply(server.pid, patch(project, "fix_parse_v2"))
    assert_v2(server)
    listed = control.list_patches(server.pid)["patches"]
    assert [(p["name"], p["state"], p["functions"][0]["in_effect"]) for p in listed] == [
        ("fix_parse", "active", False), ("fix_parse_v2", "active", True)]
    assert "not in effect: a newer patch replaces it" in control.format_list(
        control.list_patches(server.pid))

    control.revert(server.pid, "fix_parse_v2")
    assert_fixed(server)
    control.revert(server.pid, "fix_parse")
    assert_buggy(server)
    assert control.status(server.pid)["patches_active"] == 0


# ---- what is refused, leaving the target as it was ------------------------------------------


def test_apply_to_a_process_that_does_not_exist(project: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not Path(f"/proc/{gone.pid}").exists()
    with pytest.raises(FentryError, match=f"no process with pid {gone.pid}"):
        control.apply(gone.pid, patch(project))
    result = cli("apply", "--pid", str(gone.pid), str(patch(project)))
    assert_one_error_line(result, f"no process with pid {gone.pid}")


def test_apply_to_a_process_without_the_shim(project: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"], env=_server_env())
    try:
        with pytest.raises(FentryError, match=f"process {sleeper.pid} has no fentry control"):
            control.apply(sleeper.pid, patch(project))
        result = cli("apply", "--pid", str(sleeper.pid), str(patch(project)))
        assert_one_error_line(result, "no fentry control channel")
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_patch_of_another_build_is_refused(project: Path, rebuilt: Path,
                                           servers: list[Server]) -> None:
    srv = start(program(rebuilt))
    servers.append(srv)
    want = check.check_binary(program(project))["build_id"]
    have = check.check_binary(program(rebuilt))["build_id"]
    assert want != have
    with pytest.raises(FentryError, match="another build") as err:
        control.apply(srv.pid, patch(project))
    assert want in str(err.value) and have in str(err.value)
    result = cli("apply", "--pid", str(srv.pid), str(patch(project)))
    assert_one_error_line(result, want, have)
    assert_buggy(srv)
    assert_no_patches(srv)


def test_world_writable_patch_is_refused(server: Server, project: Path, tmp_path: Path) -> None:
    writable = tmp_path / "fix_parse.so"
    shutil.copyfile(patch(project), writable)
    writable.chmod(0o666)
    with pytest.raises(FentryError, match="writable by group or others"):
        control.apply(server.pid, writable)
    result = cli("apply", "--pid", str(server.pid), str(writable))
    assert_one_error_line(result, "writable by group or others", "chmod go-w")
    assert_buggy(server)
    assert_no_patches(server)


def test_missing_patch_file(server: Server, tmp_path: Path) -> None:
    result = cli("apply", "--pid", str(server.pid), str(tmp_path / "nope.so"))
    assert_one_error_line(result, "does not exist", "meson compile patches")
    assert_buggy(server)


@pytest.mark.needs_nobody
def test_another_uid_is_refused(server: Server) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": readable_package_parent()}
    python = python_for_nobody(env)
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         python, "-m", "fentry_build", "list", "--pid", str(server.pid)],
        env=env, capture_output=True, text=True, timeout=30, cwd="/")
    assert result.stdout == ""
    assert_one_error_line(result, "permission denied")
    assert_buggy(server)


# ---- what a client may throw at the server --------------------------------------------------


def test_garbage_is_answered_with_errors(server: Server) -> None:
    rng = random.Random(1234)
    lines = [bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randint(1, 300)))
             for _ in range(50)]
    with connect(server.port) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))
        answers = [read_line(s) for _ in lines]
    assert all(a.startswith("ERR ") for a in answers), answers
    assert ask(server.port, b"PI\0NG") == "ERR request contains a NUL byte"
    assert_buggy(server)


def test_a_huge_line_is_refused_and_the_connection_goes_on(server: Server) -> None:
    with connect(server.port) as s:
        s.sendall(b"SUM " + b"1" * (1024 * 1024) + b"\nPING\n")
        assert read_line(s) == f"ERR request longer than {REQUEST_MAX} bytes"
        assert read_line(s) == "PONG"
        longest = b"SUM 1".ljust(REQUEST_MAX, b" ")  # exactly REQUEST_MAX bytes: served
        s.sendall(longest + b"\n" + longest + b" \n")
        assert read_line(s) == "OK 1"
        assert read_line(s) == f"ERR request longer than {REQUEST_MAX} bytes"
    assert_buggy(server)


def test_half_sent_requests(server: Server) -> None:
    with connect(server.port) as half:
        half.sendall(b"SUM 1 2")
        time.sleep(0.1)
        assert ask(server.port, "PING") == "PONG"  # others are served meanwhile
        half.sendall(b" 3\n")
        assert read_line(half) == "OK 6"
    for _ in range(8):  # more half-sent requests than workers, then gone
        with connect(server.port) as gone:
            gone.sendall(b"SUM 4 5")
    assert_buggy(server)


def _control_connection(pid: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(control.socket_path(pid)))
    return s


def _control_reply(s: socket.socket) -> dict[str, object]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, f"the control channel closed without a reply; got {data!r}"
        data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def test_the_control_socket_survives_garbage_huge_and_half_sent_lines(
        server: Server, project: Path) -> None:
    rng = random.Random(99)
    with _control_connection(server.pid) as s:
        for _ in range(20):
            s.sendall(bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(200))
                      + b"\n")
            reply = _control_reply(s)
            assert reply["ok"] is False and isinstance(reply["error"], str)
    with _control_connection(server.pid) as s:
        try:
            s.sendall(b"x" * (1024 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped reading after its line limit, and said why
        reply = _control_reply(s)
        assert reply["ok"] is False and "longer than" in str(reply["error"])
    with _control_connection(server.pid) as half:
        half.sendall(b'{"op": "li')
        assert control.status(server.pid)["pid"] == server.pid  # others are served meanwhile
        assert_buggy(server)
        half.sendall(b'st"}\n')
        assert _control_reply(half) == {"ok": True, "patches": []}
    with _control_connection(server.pid) as gone:
        gone.sendall(b'{"op": "status"')
    control.apply(server.pid, patch(project))
    assert_fixed(server)


# ---- the demo ---------------------------------------------------------------------------------


def test_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    result = subprocess.run([*CLI, "demo"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"> {BUG_REQUEST}\n  < {BUGGY}" in out
    assert f"> {BUG_REQUEST}\n  < {FIXED}" in out
    assert out.index(BUGGY) < out.index(FIXED) < out.rindex(BUGGY)  # before, after, reverted
    assert "$ fentry-build apply --pid " in out and " build/fix_parse.so\n" in out
    assert "$ meson compile -C build patches" in out
    assert ": 0 failed, " in out
    assert "reverted fix_parse" in out
    assert "parse_request: in effect" in out
    assert "it exited cleanly (status 0)" in out
    assert [p for p in tmp_path.iterdir() if p.name.startswith("fentry-demo-")] == []


def _processes_running_from(folder: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder) in os.readlink(proc / "exe"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_demo_fails_with_one_line_and_cleans_up(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fentry_build import demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo, "BUGGY_ANSWER", "an answer the server never gives")
    with pytest.raises(FentryError, match=re.escape(f"before the patch: the server answered "
                                                    f"'{BUGGY}'")):
        demo.run_demo()
    assert list(tmp_path.iterdir()) == []
    assert _processes_running_from(tmp_path) == []


# ---- a fix that needs the program's statics and a shadow variable ----------------------


def test_fix_stats_reaches_the_programs_statics_and_adds_a_shadow_field(
        server: Server, project: Path) -> None:
    bad = "ERR unknown command 'BAD' (try PING, SUM or QUIT)"
    assert ask(server.port, "BAD") == bad
    assert ask(server.port, "STATS") == "OK requests=1 errors=0", "the counting bug"
    control.apply(server.pid, patch(project, "fix_stats"))
    assert ask(server.port, "BAD") == bad
    assert ask(server.port, "STATS") == (
        "OK requests=2 errors=1 last_error=unknown command 'BAD' (try PING, SUM or QUIT)")
    # The replacement calls the program's parse_request through its site: a fix of
    # parse_request applied later is in effect inside fix_stats too.
    assert ask(server.port, BUG_REQUEST) == BUGGY
    control.apply(server.pid, patch(project))
    assert ask(server.port, BUG_REQUEST) == FIXED
    assert ask(server.port, "STATS") == (
        "OK requests=4 errors=2 last_error=too many numbers (at most 8)")
    # The counters the patch updated are the program's own: the original code sees them.
    control.revert(server.pid, "fix_stats")
    assert ask(server.port, "STATS") == "OK requests=4 errors=2"
    assert server.alive()
