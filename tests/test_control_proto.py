"""The control channel on its own: shim/control/ (json, protocol, endpoint, control) and the
audit trail (shim/core/audit.c) over real Unix sockets.

The loader is replaced by tests/c/loader_stub.c (it keeps a list of "patches" and loads
nothing), and tests/c/control_host.c is the program: it starts the channel and obeys
commands on stdin (fork, spawn, wait, exit).  Everything else is real: processes,
sockets, fork(), SO_PEERCRED, another uid (``nobody`` through setpriv), and the
Python client fentry_build.client.control.

The reader in json.c is also compared with Python's json module on random and mutated
inputs, under AddressSanitizer and UBSan when the compiler has them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fentry_build import paths
from fentry_build.client import channel, control
from fentry_build.errors import FentryError

from support.builds import SHIM_CFLAGS, run, shim_includes
from support.nobody import readable_package_parent

TESTS = Path(__file__).resolve().parent
NOBODY = 65534
LINE_MAX = 65536
STUB_SHA256 = "5b" * 32  # what tests/c/loader_stub.c reports for every file

needs_root = pytest.mark.needs_root
needs_nobody = pytest.mark.needs_nobody


# ---- building ------------------------------------------------------------------------


def _shim(name: str) -> str:
    return str(paths.shim_dir() / name)


@pytest.fixture(scope="session")
def host_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("control") / "control_host"
    sources = [_shim(f"control/{unit}.c") for unit in ("json", "control", "endpoint", "protocol")]
    run(["gcc", *SHIM_CFLAGS, *shim_includes(), *sources, _shim("core/audit.c"), _shim("core/costs.c"),
         str(TESTS / "c" / "loader_stub.c"), str(TESTS / "c" / "control_host.c"),
         "-o", str(out), "-lpthread"])
    return out


@pytest.fixture(scope="session")
def json_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("json") / "json_driver"
    sources = [_shim("control/json.c"), str(TESTS / "c" / "json_driver.c")]
    sanitized = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    try:
        run(["gcc", *SHIM_CFLAGS, *sanitized, *shim_includes(), *sources, "-o", str(out)])
        subprocess.run([str(out)], input=b"", check=True, capture_output=True)
    except (AssertionError, subprocess.CalledProcessError):
        run(["gcc", *SHIM_CFLAGS, *shim_includes(), *sources, "-o", str(out)])
    return out


# ---- running the host ----------------------------------------------------------------


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short runtime folder of our own (socket paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="fctl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _host_env(rundir: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FENTRY_") and k != "XDG_RUNTIME_DIR"}
    if rundir is not None:
        env["FENTRY_RUNTIME_DIR"] = str(rundir)
    env.update(extra or {})
    return env


class Host:
    """control_host running with its channel in `rundir`."""

    def __init__(self, binary: Path, rundir: Path | None, extra: dict[str, str] | None = None,
                 preexec_fn: Any = None) -> None:
        self.rundir = rundir
        self.children: list[int] = []
        self.proc = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_host_env(rundir, extra), preexec_fn=preexec_fn, text=True)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        self.pid = int(ready[1])

    @property
    def sock(self) -> Path:
        assert self.rundir is not None
        return self.rundir / f"{self.pid}.sock"

    def command(self, cmd: str) -> list[str]:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def fork(self) -> int:
        answer = self.command("fork")
        assert answer[0] == "child"
        self.children.append(int(answer[1]))
        return int(answer[1])

    def finish(self) -> tuple[int, str]:
        """Ask it to exit(0); its return code and everything it wrote on stderr."""
        _, err = self.proc.communicate("exit\n", timeout=10)
        return self.proc.returncode, err

    def cleanup(self) -> None:
        for child in self.children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def start_host(host_binary: Path) -> Iterator[Any]:
    hosts: list[Host] = []

    def start(rundir: Path | None, extra: dict[str, str] | None = None,
              preexec_fn: Any = None) -> Host:
        hosts.append(Host(host_binary, rundir, extra, preexec_fn))
        return hosts[-1]

    yield start
    for h in hosts:
        h.cleanup()


@pytest.fixture
def host(start_host: Any, rundir: Path) -> Host:
    return start_host(rundir)


# ---- talking to it without the client ------------------------------------------------


def connect(path: Path, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    for _ in range(500):
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:  # a full backlog: the process is busy, come back
            time.sleep(0.01)
    raise AssertionError(f"{path}: the backlog stayed full")


def read_lines(s: socket.socket, n: int) -> list[bytes]:
    data = b""
    while data.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[:n]


def read_until_eof(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def talk(path: Path, *requests: bytes) -> list[dict[str, Any]]:
    """Send the request lines in one write; one parsed reply per line."""
    with connect(path) as s:
        s.sendall(b"".join(r + b"\n" for r in requests))
        lines = read_lines(s, len(requests))
    assert len(lines) == len(requests), lines
    return [json.loads(line) for line in lines]


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def assert_alive(h: Host) -> None:
    assert h.proc.poll() is None, f"host died: {h.proc.returncode}"
    assert talk(h.sock, b'{"op":"status"}')[0]["ok"] is True


# ---- the protocol --------------------------------------------------------------------


def test_status(host: Host) -> None:
    (reply,) = talk(host.sock, b'{"op":"status"}')
    assert reply == {
        "ok": True, "protocol": 2, "pid": host.pid, "program": os.path.realpath(host.proc.args[0]),
        "build_id": "0102030405060708090a0b0c0d0e0f1011121314", "mode": "dispatch",
        "mode_reason": "stub loader", "rewrite_error": None, "sites": "calls", "far_reason": None,
        "patches_active": 0, "patches_loaded": 0,
        "costs": {"startup": {"seconds": 0.0, "sites_written": 0}, "last_apply": None,
                  "last_revert": None, "last_unload": None, "sites_written": 0, "batches": 0,
                  "last_batch_seconds": 0.0, "trampolines": 0, "sites_direct": 0,
                  "unload_checks": {"runs": 0, "threads_blocked": 0, "threads_signalled": 0},
                  "memory": {"tables": 0, "trampolines": 0, "sites": 0, "patch_copies": 0,
                             "patch_mappings": 0}},
    }


def test_load_list_revert(host: Host, tmp_path: Path) -> None:
    patch = tmp_path / "fix.so"
    patch.write_bytes(b"")
    load, listed, revert, after = talk(
        host.sock,
        json.dumps({"op": "load", "path": str(patch)}).encode(),
        b'{"op":"list"}',
        b'{"op":"revert","name":"fix"}',
        b'{"op":"list"}',
    )
    assert load == {"ok": True, "name": "fix", "sha256": STUB_SHA256, "functions": 2,
                      "changed": True}
    (p,) = listed["patches"]
    assert (p["name"], p["path"], p["state"], p["sha256"]) == ("fix", str(patch), "active",
                                                               STUB_SHA256)
    assert abs(p["applied_at"] - time.time()) < 60
    assert p["built_at"] == pytest.approx(p["applied_at"] - 60)  # the stub's stand-in mtime
    assert p["functions"] == [
        {"name": "compute", "file": None, "in_effect": True},
        {"name": "parse", "file": "parser.c", "in_effect": True},
    ]
    assert revert == {"ok": True, "name": "fix"}
    assert after["patches"][0]["state"] == "reverted"
    assert [f["in_effect"] for f in after["patches"][0]["functions"]] == [False, False]


def test_reply_strings_are_escaped(host: Host, tmp_path: Path) -> None:
    patch = tmp_path / 'we"ird\\ na\tme é.so'
    patch.write_bytes(b"")
    load, listed = talk(host.sock, json.dumps({"op": "load", "path": str(patch)}).encode(),
                        b'{"op":"list"}')
    assert load["name"] == 'we"ird\\ na\tme é'
    assert listed["patches"][0]["path"] == str(patch)


@pytest.mark.parametrize("line, error, code", [
    (b"", "empty request", "bad_request"),
    (b"   ", "empty request", "bad_request"),
    (b"garbage", "expected a JSON object", "bad_request"),
    (b"[1, 2]", "found an array", "bad_request"),
    (b'"load"', "found a string", "bad_request"),
    (b"42", "found a number", "bad_request"),
    (b"null", "found null", "bad_request"),
    (b"{", "expected a string as object key", "bad_request"),
    (b'{"op":"list"', "expected ',' or '}'", "bad_request"),
    (b'{"op":"list",}', "expected a string as object key", "bad_request"),
    (b'{"op" "list"}', "expected ':'", "bad_request"),
    (b'{"op":"list"} {}', "unexpected data after the object", "bad_request"),
    (b'{"op":"li\x00st"}', "control character in string", "bad_request"),
    (b'{"op":"li\x01st"}', "control character in string", "bad_request"),
    (b'{"op":"\xff"}', "invalid UTF-8", "bad_request"),
    (b'{"op":"\xc0\x80"}', "invalid UTF-8", "bad_request"),
    (b'{"op":"\xed\xa0\x80"}', "invalid UTF-8", "bad_request"),
    (b'{"op":"\\u0000"}', "\\u0000 is not allowed", "bad_request"),
    (b'{"op":"\\ud800"}', "high surrogate not followed by a low surrogate", "bad_request"),
    (b'{"op":"\\udc00"}', "unpaired low surrogate", "bad_request"),
    (b'{"op":"\\u12"}', "four hex digits", "bad_request"),
    (b'{"op":"\\x"}', "invalid escape", "bad_request"),
    (b'{"a":01}', "expected ',' or '}'", "bad_request"),
    (b'{"a":-}', "digit expected", "bad_request"),
    (b'{"a":1.}', "digit expected", "bad_request"),
    (b'{"a":1e}', "digit expected", "bad_request"),
    (b'{"a":NaN}', "unexpected character", "bad_request"),
    (b'{"a":tru}', "unexpected character", "bad_request"),
    (b'{"a":' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32 levels", "bad_request"),
    (b"{}", 'no string member "op" (one of: load, revert, unload, list, status, history)', "bad_request"),
    (b'{"op":1}', 'no string member "op"', "bad_request"),
    (b'{"op":["list"]}', 'no string member "op"', "bad_request"),
    (b'{"op":"list","op":"status"}', 'member "op" given twice', "bad_request"),
    (b'{"op":"' + b"x" * 100 + b'"}', 'member "op" is too long', "bad_request"),
    (b'{"op":"nope"}', 'unknown op "nope": known ops are load, revert, unload, list, status, history', "bad_request"),
    (b'{"op":"load"}', 'load needs a string member "path"', "bad_request"),
    (b'{"op":"load","path":7}', 'load needs a string member "path"', "bad_request"),
    (b'{"op":"load","path":"x.so"}', 'the path must be absolute, not "x.so"', "bad_request"),
    (b'{"op":"load","path":"/no/such/file.so"}', "cannot open /no/such/file.so", "bad_file"),
    (b'{"op":"load","path":"/' + b"a" * 5000 + b'"}', 'member "path" is too long', "bad_request"),
    (b'{"op":"revert"}', 'revert needs a string member "name"', "bad_request"),
    (b'{"op":"revert","name":"absent"}', "no active patch named absent", "no_such_patch"),
])
def test_bad_requests(host: Host, line: bytes, error: str, code: str) -> None:
    (reply,) = talk(host.sock, line)
    assert reply["ok"] is False
    assert error in reply["error"]
    assert reply["code"] == code
    assert "\n" not in reply["error"]
    assert_alive(host)


@pytest.mark.parametrize("line", [
    b'{"op":"list","extra":{"nested":[1,2.5e-3,-0,true,false,null,"\\ud83d\\ude00"]}}',
    b'\t {"op" : "list"} \r',
    b'{"a":' + b"[" * 30 + b"]" * 30 + b',"op":"list"}',
    b'{"\\u006fp":"\\u006cist"}',
])
def test_valid_requests_in_odd_shapes(host: Host, line: bytes) -> None:
    assert talk(host.sock, line) == [{"ok": True, "patches": []}]


def test_pipelined_requests_get_replies_in_order(host: Host) -> None:
    replies = talk(host.sock, b'{"op":"status"}', b"junk", b'{"op":"list"}', b'{"op":"x"}')
    assert [r["ok"] for r in replies] == [True, False, True, False]
    assert "pid" in replies[0] and "patches" in replies[2]


def test_random_garbage_gets_one_error_per_line(host: Host) -> None:
    rng = random.Random(1234)
    for _ in range(20):
        blobs = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b"")
                 for _ in range(10)]
        replies = talk(host.sock, *blobs)
        assert all(r["ok"] is False for r in replies)
    assert_alive(host)


def test_history_keeps_the_newest_thousand_and_counts_the_rest(host: Host, tmp_path: Path) -> None:
    (tmp_path / "kept.so").write_bytes(b"")
    requests = [b'{"op":"revert","name":"n%d"}' % i for i in range(1100)]
    for start in range(0, 1100, 100):
        replies = talk(host.sock, *requests[start:start + 100])
        assert all(r["code"] == "no_such_patch" for r in replies)
    talk(host.sock, json.dumps({"op": "load", "path": str(tmp_path / "kept.so")}).encode())
    (reply,) = talk(host.sock, b'{"op":"history"}')
    assert (reply["kept"], reply["dropped"], len(reply["history"])) == (1000, 101, 1000)
    assert [e["seq"] for e in reply["history"]] == list(range(102, 1102))
    assert reply["history"][0]["name"] == "n101"
    last = reply["history"][-1]
    assert (last["op"], last["name"], last["path"], last["sha256"], last["ok"]) == (
        "load", "kept", str(tmp_path / "kept.so"), STUB_SHA256, True)


def test_an_expired_request_is_refused_not_carried_out_and_audited(host: Host,
                                                                    tmp_path: Path) -> None:
    patch = tmp_path / "late.so"
    patch.write_bytes(b"")
    past = time.time() - 5
    load, revert, listed, future = talk(
        host.sock,
        json.dumps({"op": "load", "path": str(patch), "deadline": past}).encode(),
        json.dumps({"op": "revert", "name": "late", "deadline": int(past)}).encode(),
        json.dumps({"op": "list", "deadline": past}).encode(),
        json.dumps({"op": "list", "deadline": time.time() + 600}).encode())
    for reply in (load, revert, listed):
        assert reply["ok"] is False and reply["code"] == "expired", reply
        assert reply["error"].startswith("request expired: its deadline passed ")
        assert reply["error"].endswith(f"before process {host.pid} came to it; nothing was done")
    assert future == {"ok": True, "patches": []}  # nothing was loaded
    (reply,) = talk(host.sock, b'{"op":"history"}')
    assert [(e["op"], e["name"], e["code"]) for e in reply["history"]] == [
        ("load", None, "expired"), ("revert", "late", "expired")]


# ---- sizes and misbehaving clients ---------------------------------------------------


def test_line_of_exactly_the_limit_is_served(host: Host) -> None:
    line = b'{"op":"list"}'
    line += b" " * (LINE_MAX - len(line))
    assert talk(host.sock, line) == [{"ok": True, "patches": []}]


def test_line_one_byte_over_the_limit_is_refused_and_closed(host: Host) -> None:
    line = b'{"op":"list"}'
    line += b" " * (LINE_MAX + 1 - len(line))
    with connect(host.sock) as s:
        s.sendall(line + b"\n")
        data = read_until_eof(s)
    assert json.loads(data) == {"ok": False, "code": "bad_request",
                                "error": f"request line longer than {LINE_MAX} bytes"}
    assert_alive(host)


def test_one_mebibyte_line(host: Host) -> None:
    with connect(host.sock) as s:
        try:
            s.sendall(b"x" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed after its reply, before we finished
        data = read_until_eof(s)
    assert json.loads(data)["error"] == f"request line longer than {LINE_MAX} bytes"
    assert_alive(host)


def test_half_line_then_disconnect(host: Host) -> None:
    for _ in range(20):
        with connect(host.sock) as s:
            s.sendall(b'{"op":"sta')
    with connect(host.sock) as s:
        s.sendall(b'{"op":"list"}')
        s.shutdown(socket.SHUT_WR)
        assert read_until_eof(s) == b""  # an unterminated last line is not a request
    assert_alive(host)


def test_disconnect_before_reply_does_not_raise_sigpipe(host: Host) -> None:
    # The host keeps SIGPIPE's default action: a send() without MSG_NOSIGNAL kills it.
    for _ in range(200):
        with connect(host.sock) as s:
            s.sendall(b'{"op":"list"}\n' * 50)
    assert_alive(host)


def test_request_then_half_close_still_gets_reply(host: Host) -> None:
    with connect(host.sock) as s:
        s.sendall(b'{"op":"list"}\n')
        s.shutdown(socket.SHUT_WR)
        assert json.loads(read_until_eof(s)) == {"ok": True, "patches": []}


# A client the control thread waited for would hold the others until its deadline: with
# FENTRY_CONTROL_REQUEST_SECONDS=3600 that is an hour, so answers at all show it did not
# wait (connect() gives each exchange 30 s before the test fails).
PATIENT = {"FENTRY_CONTROL_REQUEST_SECONDS": "3600"}


def test_stalled_client_does_not_delay_others(start_host: Any, rundir: Path) -> None:
    h = start_host(rundir, PATIENT)
    with connect(h.sock) as stalled:
        stalled.sendall(b'{"op":"sta')
        for _ in range(20):
            assert talk(h.sock, b'{"op":"status"}')[0]["ok"]


def test_client_that_never_reads_does_not_block_others(start_host: Any, rundir: Path,
                                                       tmp_path: Path) -> None:
    h = start_host(rundir, PATIENT)
    for i in range(30):
        (tmp_path / f"p{i}.so").write_bytes(b"")
        talk(h.sock, json.dumps({"op": "load", "path": str(tmp_path / f"p{i}.so")}).encode())
    with connect(h.sock) as greedy:
        greedy.setblocking(False)
        try:  # replies of ~10 KiB each pile up until its buffers are full
            for _ in range(2000):
                greedy.send(b'{"op":"list"}\n')
        except BlockingIOError:
            pass
        time.sleep(0.2)
        assert talk(h.sock, b'{"op":"status"}')[0]["patches_loaded"] == 30


def test_partial_line_is_dropped_at_its_deadline(start_host: Any, rundir: Path) -> None:
    h = start_host(rundir, {"FENTRY_CONTROL_REQUEST_SECONDS": "1"})
    with connect(h.sock) as s:
        s.sendall(b'{"op":"sta')
        data = read_until_eof(s)
    assert json.loads(data) == {"ok": False, "code": "timeout",
                                "error": "no complete request line within 1 s; closing"}
    assert_alive(h)


def test_bytes_trickling_in_do_not_extend_the_deadline(start_host: Any, rundir: Path) -> None:
    # One byte every 0.2 s, for up to a minute: a deadline that every byte pushed back
    # would never come; the absolute one (1 s) closes the connection.
    h = start_host(rundir, {"FENTRY_CONTROL_REQUEST_SECONDS": "1"})
    with connect(h.sock) as s:
        sent, closed = 0, False
        s.settimeout(0.2)
        while not closed and sent < 300:
            try:
                s.send(b" ")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            try:
                data = s.recv(4096)
                closed = data == b"" or b'"timeout"' in data
            except TimeoutError:
                pass
    assert closed, f"still connected after {sent} bytes"
    assert_alive(h)


def test_slow_clients_cannot_hold_the_channel(start_host: Any, rundir: Path) -> None:
    # 20 clients (more than the 16 slots) each send one byte every 2 s and connect again
    # whenever they are dropped, for as long as the test runs.  Every byte used to push a
    # client's idle timer back, so they held every slot for ever; with the absolute
    # deadline (3 s here) they lose their slots, and a real request waiting in the backlog
    # is accepted in its turn and answered.
    h = start_host(rundir, {"FENTRY_CONTROL_REQUEST_SECONDS": "3"})
    stop = threading.Event()
    drops = [0] * 20

    def slow(i: int) -> None:
        while not stop.is_set():
            try:
                with connect(h.sock) as s:
                    s.settimeout(2.0)
                    while not stop.is_set():
                        s.send(b"{")
                        try:
                            s.recv(4096)  # its timeout line, or EOF: dropped
                            drops[i] += 1
                            break
                        except TimeoutError:
                            continue  # still held: one more byte in 2 s
            except OSError:
                drops[i] += 1  # reset or refused while being dropped

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the slow clients hold every slot by now
        with connect(h.sock, timeout=60) as s:
            s.sendall(b'{"op":"status"}\n')
            (line,) = read_lines(s, 1)
        assert json.loads(line)["pid"] == h.pid
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert sum(drops) >= 16, drops  # the slow clients held the slots until their deadline
    assert_alive(h)


def test_ten_concurrent_clients(host: Host) -> None:
    barrier = threading.Barrier(10)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with connect(host.sock) as s:
                barrier.wait(timeout=5)
                for i in range(50):
                    s.sendall(b'{"op":"status"}\n' if i % 2 else b'{"op":"bogus"}\n')
                    (line,) = read_lines(s, 1)
                    assert json.loads(line)["ok"] is bool(i % 2)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors


def test_seventeenth_client_waits_for_a_free_slot(host: Host) -> None:
    held = [connect(host.sock) for _ in range(16)]
    try:
        for s in held:  # make sure each one has been accepted
            s.sendall(b'{"op":"list"}\n')
            read_lines(s, 1)
        with connect(host.sock, timeout=0.5) as waiting:
            waiting.sendall(b'{"op":"status"}\n')
            with pytest.raises(TimeoutError):
                waiting.recv(1)  # still in the backlog
            held.pop().close()
            waiting.settimeout(5)
            assert json.loads(read_lines(waiting, 1)[0])["pid"] == host.pid
    finally:
        for s in held:
            s.close()
    assert_alive(host)


# ---- who may connect -----------------------------------------------------------------


def _as_nobody(code: str, rundir: Path, pid: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": readable_package_parent(),
           "FENTRY_RUNTIME_DIR": str(rundir), "PID": str(pid), "SOCK": str(rundir / f"{pid}.sock")}
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=30, cwd="/")


CLIENT_AS_NOBODY = """
import os
from fentry_build.client import control
from fentry_build.errors import FentryError
try:
    control.status(int(os.environ["PID"]))
except FentryError as e:
    print(e)
"""

RAW_AS_NOBODY = """
import os, socket
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["SOCK"])
print(s.makefile("rb").readline().decode(), end="")
"""


@needs_nobody
def test_other_uid_cannot_even_connect(host: Host) -> None:
    assert stat.S_IMODE(host.rundir.stat().st_mode) == 0o700  # root's own folder
    result = _as_nobody(CLIENT_AS_NOBODY, host.rundir, host.pid)
    assert result.stdout.strip() == (f"permission denied: process {host.pid} runs as uid 0; only "
                                     "that user or root may control it"), result
    assert_alive(host)


@needs_nobody
def test_other_uid_is_refused_by_peer_credentials(host: Host) -> None:
    # Open the way on purpose: a traversable folder (0711 is accepted: nobody can write
    # it) and a socket anyone may connect to.  SO_PEERCRED is then the only check left.
    host.rundir.chmod(0o711)
    host.sock.chmod(0o666)
    result = _as_nobody(RAW_AS_NOBODY, host.rundir, host.pid)
    expected = (f"permission denied: uid {NOBODY} may not control process {host.pid} "
                f"(uid {os.geteuid()})")
    assert json.loads(result.stdout) == {"ok": False, "code": "not_permitted", "error": expected}, result
    # The client does not get that far: it may not see which socket the process serves.
    result = _as_nobody(CLIENT_AS_NOBODY, host.rundir, host.pid)
    assert result.stdout.startswith(f"permission denied: process {host.pid} runs as uid 0"), result
    assert_alive(host)
    # The attempt is in the audit trail, with the peer's uid and pid.
    (reply,) = talk(host.sock, b'{"op":"history"}')
    attempts = [(e["op"], e["peer_uid"], e["ok"], e["code"], e["error"]) for e in reply["history"]]
    assert attempts == [("connect", NOBODY, False, "not_permitted", expected)]
    assert all(e["peer_pid"] > 0 and e["via"] == "socket" for e in reply["history"])


# ---- the socket's life ---------------------------------------------------------------


def test_socket_is_private_and_removed_at_exit(host: Host) -> None:
    st = host.sock.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert host.finish() == (0, "")
    assert not host.sock.exists()


def _tasks(pid: int) -> dict[int, str]:
    tasks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tasks[int(task.name)] = (task / "comm").read_text().strip()
    return tasks


def test_thread_is_named_and_blocks_all_signals(host: Host) -> None:
    # The thread names itself when it starts, which may be just after the socket exists.
    assert wait_for(lambda: "fentry-ctl" in _tasks(host.pid).values())
    (tid,) = [t for t, name in _tasks(host.pid).items() if name == "fentry-ctl"]
    status = Path(f"/proc/{host.pid}/task/{tid}/status").read_text()
    blocked = int(status.split("SigBlk:")[1].split()[0], 16)
    for sig in range(1, 32):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            assert blocked & (1 << (sig - 1)), f"signal {sig} not blocked in the control thread"


def test_control_off(start_host: Any, rundir: Path) -> None:
    h = start_host(rundir, {"FENTRY_CONTROL": "0"})
    assert list(rundir.iterdir()) == []
    assert "fentry-ctl" not in _tasks(h.pid).values()
    with pytest.raises(FentryError, match=f"^process {h.pid} has no fentry control channel: "
                       r"FENTRY_CONTROL=0 \(the program runs without a channel\)$"):
        control.status(h.pid)
    assert h.finish() == (0, "")


def test_stale_socket_of_a_dead_process_with_our_pid_is_replaced(
        start_host: Any, rundir: Path) -> None:
    def leave_stale_socket() -> None:  # runs in the child, before exec: same pid
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(rundir / f"{os.getpid()}.sock"))
        s.close()

    h = start_host(rundir, preexec_fn=leave_stale_socket)
    assert talk(h.sock, b'{"op":"status"}')[0]["pid"] == h.pid
    assert h.finish() == (0, "")


def _listening(path: Path) -> bool:
    try:
        _listener_inode(path)
        return True
    except AssertionError:
        return False


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _listener_inode(path: Path) -> int:
    # Num RefCount Protocol Flags Type St Inode Path; accepted sockets show the path too.
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path) and fields[3] == "00010000":
            return int(fields[6])
    raise AssertionError(f"{path} is not a listening socket")


def test_fork_child_gets_its_own_channel(host: Host) -> None:
    with connect(host.sock) as open_client:  # inherited by the child, which must close it
        open_client.sendall(b'{"op":"list"}\n')
        read_lines(open_client, 1)
        child = host.fork()
        child_sock = host.rundir / f"{child}.sock"
        assert wait_for(lambda: _listening(child_sock))
        assert talk(child_sock, b'{"op":"status"}')[0]["pid"] == child
        assert talk(host.sock, b'{"op":"status"}')[0]["pid"] == host.pid
        assert "fentry-ctl" in _tasks(child).values()
        listener = _listener_inode(child_sock)  # and the one `talk` used, once closed
        assert wait_for(lambda: _socket_inodes(child) == {listener}), _socket_inodes(child)
        open_client.sendall(b'{"op":"status"}\n')  # the parent still serves it
        assert json.loads(read_lines(open_client, 1)[0])["pid"] == host.pid

    os.kill(child, signal.SIGUSR1)  # the child exit(0)s: its atexit handler runs
    assert host.command("wait") == ["reaped", str(child), "0"]
    assert not child_sock.exists()
    assert host.sock.exists()
    assert talk(host.sock, b'{"op":"status"}')[0]["pid"] == host.pid
    assert host.finish() == (0, "")
    assert not host.sock.exists()


def test_child_that_execs_leaves_a_socket_the_next_start_sweeps(
        host: Host, start_host: Any) -> None:
    answer = host.command("spawn")  # fork + exec /bin/true: no exit handlers run
    stale = host.rundir / f"{answer[1]}.sock"
    assert stale.exists()
    other = start_host(host.rundir)
    assert not stale.exists()
    assert host.sock.exists() and other.sock.exists()  # live ones stay
    assert_alive(host)
    assert_alive(other)


# ---- the runtime folder --------------------------------------------------------------


def _refusal(h: Host) -> str:
    """The one line the host printed on stderr; the client reports the same reason."""
    with pytest.raises(channel.NoChannel) as no_channel:
        control.status(h.pid)
    code, err = h.finish()
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fentry: control channel off: "), err
    # The reason travels in a memfd's name (at most 249 bytes): maybe cut short.
    reason = lines[0].removeprefix("fentry: control channel off: ")
    assert reason.startswith(no_channel.value.reason), (reason, no_channel.value.reason)
    assert len(no_channel.value.reason) >= min(len(reason), 200)
    return lines[0]


def test_folder_writable_by_others_is_refused(start_host: Any, rundir: Path) -> None:
    rundir.chmod(0o777)
    h = start_host(rundir)
    assert f"{rundir} is writable by group or others (mode 0777)" in _refusal(h)
    assert list(rundir.iterdir()) == []


def test_symlinked_folder_is_refused(start_host: Any, rundir: Path) -> None:
    (rundir / "real").mkdir(mode=0o700)
    (rundir / "link").symlink_to(rundir / "real")
    h = start_host(rundir / "link", {"FENTRY_RUNTIME_DIR": f"{rundir}/link/"})
    assert f"{rundir}/link is a symlink" in _refusal(h)
    assert list((rundir / "real").iterdir()) == []


@needs_root
def test_folder_of_another_user_is_refused(start_host: Any, rundir: Path) -> None:
    os.chown(rundir, NOBODY, NOBODY)
    h = start_host(rundir)
    assert f"{rundir} belongs to uid {NOBODY}, not to this process's uid 0" in _refusal(h)


def test_folder_that_is_a_file_is_refused(start_host: Any, rundir: Path) -> None:
    (rundir / "file").write_text("")
    h = start_host(rundir / "file")
    assert f"{rundir}/file is not a folder" in _refusal(h)


def test_relative_folder_is_refused(start_host: Any) -> None:
    h = start_host(None, {"FENTRY_RUNTIME_DIR": "relative/dir"})
    assert "FENTRY_RUNTIME_DIR=relative/dir is not an absolute path" in _refusal(h)


def test_uncreatable_folder_is_refused(start_host: Any, rundir: Path) -> None:
    h = start_host(rundir / "no" / "such")
    assert f"cannot create {rundir}/no/such: No such file or directory" in _refusal(h)


def test_too_long_socket_path_is_refused(start_host: Any, rundir: Path) -> None:
    deep = rundir / ("d" * 100)
    deep.mkdir(mode=0o700)
    h = start_host(deep)
    assert "would be longer than 107 bytes" in _refusal(h)


def test_xdg_runtime_dir_is_the_default(start_host: Any, rundir: Path) -> None:
    h = start_host(None, {"XDG_RUNTIME_DIR": str(rundir)})
    folder = rundir / "fentry"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / f"{h.pid}.sock").exists()
    assert control.socket_path(h.pid) == folder / f"{h.pid}.sock"
    assert control.status(h.pid)["pid"] == h.pid
    assert h.finish() == (0, "")


def test_tmp_folder_is_the_last_resort(start_host: Any) -> None:
    h = start_host(None)
    path = Path(f"/tmp/fentry-{os.geteuid()}/{h.pid}.sock")
    assert path.exists()
    assert control.socket_path(h.pid) == path
    assert h.finish() == (0, "")
    assert not path.exists()


# ---- the Python client ---------------------------------------------------------------


def test_client_finds_the_socket_the_process_serves_whatever_our_environment(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FENTRY_RUNTIME_DIR", "/nonexistent")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")
    assert control.socket_path(host.pid) == host.sock
    assert control.status(host.pid)["pid"] == host.pid


def test_client_finds_the_channel_of_a_child_after_the_environment_changed(
        host: Host, rundir: Path) -> None:
    # Daemons clear and set their environment; a fork child's channel follows the new one
    # while /proc/PID/environ still shows the start-up one (which named `rundir`).
    elsewhere = rundir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    assert host.command("clearenv") == ["env"]
    assert host.command(f"setenv FENTRY_RUNTIME_DIR {elsewhere}") == ["env"]
    child = host.fork()
    assert wait_for(lambda: (elsewhere / f"{child}.sock").exists())
    assert f"FENTRY_RUNTIME_DIR={rundir}".encode() in Path(f"/proc/{child}/environ").read_bytes()
    assert control.socket_path(child) == elsewhere / f"{child}.sock"
    assert control.status(child)["pid"] == child
    assert control.status(host.pid)["pid"] == host.pid


def test_client_does_not_need_the_start_up_environment(host: Host) -> None:
    # Programs that set their process title overwrite the environment strings in place.
    assert host.command("clobber") == ["clobbered"]
    assert b"FENTRY_RUNTIME_DIR" not in Path(f"/proc/{host.pid}/environ").read_bytes()
    assert control.status(host.pid)["pid"] == host.pid


def test_client_refuses_a_folder_others_may_write_and_sends_nothing(host: Host) -> None:
    host.rundir.chmod(0o777)
    try:
        with pytest.raises(FentryError, match=f"^{host.sock}: its folder {host.rundir} is "
                                              r"writable by group or others \(mode 0777\): "
                                              "refusing$"):
            control.revert(host.pid, "anything")
    finally:
        host.rundir.chmod(0o700)
    assert talk(host.sock, b'{"op":"history"}')[0]["history"] == []  # nothing reached it


@needs_root
def test_client_refuses_a_folder_of_another_user(host: Host) -> None:
    os.chown(host.rundir, NOBODY, NOBODY)
    try:
        with pytest.raises(FentryError, match=f"its folder {host.rundir} belongs to uid {NOBODY}, "
                                              r"not to uid 0 \(process \d+'s\) or root: refusing$"):
            control.status(host.pid)
    finally:
        os.chown(host.rundir, 0, 0)


def test_client_refuses_a_socket_another_process_serves_and_sends_nothing(
        host: Host, rundir: Path) -> None:
    # Someone who could write the folder replaced the process's socket file with theirs:
    # the path the process bound now leads to another listener.  Its peer credentials
    # give it away; it receives nothing.
    fake_dir = Path(tempfile.mkdtemp(prefix="ffake-", dir="/tmp"))
    fake_dir.chmod(0o777)
    fake = subprocess.Popen(
        [*(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
           if os.geteuid() == 0 else []),
         "/usr/bin/python3", "-c", FAKE_SERVER, str(fake_dir / "fake.sock")],
        stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        os.rename(host.sock, rundir / "real.sock")
        os.rename(fake_dir / "fake.sock", host.sock)
        with pytest.raises(FentryError) as e:
            control.apply(host.pid, Path(sys.executable))
        uid = NOBODY if os.geteuid() == 0 else os.geteuid()
        assert str(e.value) == (f"{host.sock} is served by pid {fake.pid} of uid {uid}, not by "
                                f"process {host.pid}: refusing")
    finally:
        fake.kill()
        out, _ = fake.communicate()
        shutil.rmtree(fake_dir, ignore_errors=True)
    assert out == ""  # the fake accepted the connection and got no byte of a request


FAKE_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data = c.recv(65536)
    except TimeoutError:
        data = b""
    if data:
        print("received", data, flush=True)
    try:
        c.sendall(b'{"ok": true, "name": "fake", "functions": 1}\n')
    except OSError:
        pass
    c.close()
"""


def test_client_refuses_a_stopped_process_at_once(host: Host, tmp_path: Path) -> None:
    (tmp_path / "fix.so").write_bytes(b"")
    os.kill(host.pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: Path(f"/proc/{host.pid}/stat").read_text().split()[2] == "T")
        with pytest.raises(FentryError, match=rf"^process {host.pid} is stopped \(state T\), so it "
                                              rf"cannot answer; continue it \(kill -CONT {host.pid}\)"):
            control.apply(host.pid, tmp_path / "fix.so")
    finally:
        os.kill(host.pid, signal.SIGCONT)
    assert control.list_patches(host.pid)["patches"] == []  # nothing was queued
    assert control.history(host.pid)["history"] == []


def test_client_round_trip_and_formatting(host: Host, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fix.so").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    applied = control.apply(host.pid, Path("fix.so"))  # relative: resolved by the client
    assert applied == {"ok": True, "name": "fix", "sha256": STUB_SHA256, "functions": 2,
                      "changed": True}
    assert control.format_apply(applied) == "applied fix (2 functions replaced)"

    listed = control.list_patches(host.pid)
    assert listed["patches"][0]["path"] == str(tmp_path / "fix.so")
    text = control.format_list(listed)
    assert text.splitlines()[0].startswith("fix  active  version 5b5b5b5b5b5b  built ")
    assert "    parse (parser.c): in effect" in text

    status = control.status(host.pid)
    assert (status["patches_active"], status["patches_loaded"]) == (1, 1)
    assert "patches:   1 active, 1 loaded" in control.format_status(status)
    assert f"pid:       {host.pid}" in control.format_status(status)

    assert control.format_revert(control.revert(host.pid, "fix")) == "reverted fix"
    assert "not in effect" in control.format_list(control.list_patches(host.pid))
    assert control.format_list({"ok": True, "patches": []}) == "no patches loaded"


def test_client_errors_from_the_process_are_prefixed(host: Host, tmp_path: Path) -> None:
    (tmp_path / "refuse.so").write_bytes(b"")
    with pytest.raises(FentryError) as e:
        control.apply(host.pid, tmp_path / "refuse.so")
    assert str(e.value).startswith(f"apply refuse.so to pid {host.pid}: patch refuse was built")
    with pytest.raises(FentryError, match=f"^revert nope in pid {host.pid}: no active patch named nope$"):
        control.revert(host.pid, "nope")
    reply = control.request(host.pid, {"op": "dance"})
    assert reply["ok"] is False and "known ops are" in reply["error"]


def test_client_checks_the_patch_file_first(tmp_path: Path) -> None:
    with pytest.raises(FentryError, match="does not exist"):
        control.apply(1, tmp_path / "missing.so")
    with pytest.raises(FentryError, match="is not a regular file"):
        control.apply(1, tmp_path)


def test_client_no_such_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(FentryError, match=f"^no process with pid {proc.pid}$"):
        control.status(proc.pid)
    with pytest.raises(FentryError, match="^no process with pid -3$"):
        control.status(-3)


def test_client_process_without_the_shim(rundir: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"], env=_host_env(rundir))
    try:
        with pytest.raises(FentryError, match=f"process {proc.pid} has no fentry control channel: "
                                              "it was not built with the fentry shim"):
            control.list_patches(proc.pid)
    finally:
        proc.kill()
        proc.wait()


SILENT_LISTENER = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(sys.argv[1], f"{os.getpid()}.sock"))
s.listen(1)  # connections wait in the backlog; nothing is ever read
print("listening", flush=True)
time.sleep(60)
"""


def test_client_request_not_taken_by_its_deadline_expires(rundir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SILENT_LISTENER, str(rundir)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        with pytest.raises(FentryError, match=f"^process {proc.pid} did not take the request "
                                              "within 0.5 s; it expired and will not be carried "
                                              "out later$"):
            control.request(proc.pid, {"op": "status"}, timeout=0.5)
    finally:
        proc.kill()
        proc.wait()


def test_client_refuses_a_thread_id_naming_its_process(host: Host) -> None:
    assert wait_for(lambda: "fentry-ctl" in _tasks(host.pid).values())
    (tid,) = [t for t, name in _tasks(host.pid).items() if name == "fentry-ctl"]
    with pytest.raises(FentryError, match=f"^{tid} is a thread of process {host.pid}; give "
                                          f"--pid {host.pid}$"):
        control.status(tid)


def test_client_history_and_its_formatting(host: Host, tmp_path: Path) -> None:
    (tmp_path / "fix.so").write_bytes(b"")
    control.apply(host.pid, tmp_path / "fix.so")
    with pytest.raises(FentryError):
        control.revert(host.pid, "nope")
    reply = control.history(host.pid)
    lines = control.format_history(reply).splitlines()
    assert len(lines) == 2
    me = f"by uid {os.geteuid()} pid {os.getpid()}"
    assert lines[0].endswith(f"  apply fix ({tmp_path / 'fix.so'}, sha256 {STUB_SHA256[:16]})  "
                             f"{me}: done")
    assert lines[1].endswith(f"  revert nope  {me}: refused (no_such_patch): no active patch named nope")
    assert control.format_history({"ok": True, "history": [], "dropped": 0}) == \
        "no apply, revert or unload so far"


# ---- json.c against Python's json ----------------------------------------------------


class _Pairs(list):  # type: ignore[type-arg]
    """An object as Python's json reads it with object_pairs_hook: duplicates kept."""


def _no_constants(name: str) -> None:
    raise ValueError(name)


def _strings_ok(value: Any, depth: int = 1) -> bool:
    """What json.c refuses beyond Python: depth > 32, \\u0000, lone surrogates."""
    if isinstance(value, str):
        return "\0" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, _Pairs):
        return depth <= 32 and all(_strings_ok(k) and _strings_ok(v, depth + 1) for k, v in value)
    if isinstance(value, list):
        return depth <= 32 and all(_strings_ok(v, depth + 1) for v in value)
    return True


Member = tuple[str, str | float]


def _expected(data: bytes) -> list[Member] | None:
    """The members json.c must report for `data` if it agrees with Python, None if it fails:
    strings, and numbers (as floats)."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_Pairs,
                           parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, _Pairs) or not _strings_ok(value):
        return None
    return [(k, v if isinstance(v, str) else float(v)) for k, v in value
            if isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))]


def _reported(line: str) -> list[Member] | None:
    """The driver's line as members (None for ERR)."""
    if not line.startswith("OK"):
        return None
    members: list[Member] = []
    for item in line[2:].split():
        if "=" in item:
            key, value = item.split("=")
            members.append((bytes.fromhex(key).decode(), bytes.fromhex(value).decode()))
        else:
            key, number = item.split("#")
            members.append((bytes.fromhex(key).decode(), float(number)))
    return members


_ATOMS = ["1", "-0.5e+3", "0", "1E400", "true", "false", "null", '""', '"x"', '"\\/"',
          '"\\ud83d\\ude00"', '"\\u00e9\\n"', '"é"', '"\\ud800"', '"\\u0000"', "[]", "{}"]
_TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\\u", b"\\ud83d", b"\\udc00",
           b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x00",
           b" ", b"\n", b"-", b"0", b"e", b".", b"true", b"nul"]


def _random_value(rng: random.Random, depth: int) -> str:
    roll = rng.random()
    if depth > 35 or roll < 0.3:
        return rng.choice(_ATOMS)
    if roll < 0.5:
        return "[" + ",".join(_random_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    if roll < 0.7:
        return "{" + ",".join(f'"{rng.choice(["op", "path", "k"])}":{_random_value(rng, depth + 1)}'
                              for _ in range(rng.randrange(4))) + "}"
    chars = [chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x20), rng.randrange(0x80, 0x10000),
                             rng.randrange(0x10000, 0x110000)])) for _ in range(rng.randrange(7))]
    return json.dumps("".join(chars), ensure_ascii=rng.random() < 0.5)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        pos = rng.randrange(len(out) + 1)
        roll = rng.random()
        if roll < 0.3 and out:
            del out[min(pos, len(out) - 1)]
        elif roll < 0.6:
            out[pos:pos] = rng.choice(_TOKENS)
        elif roll < 0.8 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        else:
            del out[pos:]
    return bytes(out)


def _random_input(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if roll < 0.15:
        n = rng.randrange(28, 38)
        return ('{"a":' * n + "1" + "}" * n).encode()
    text = "{" + ",".join(f'{json.dumps(rng.choice(["op", "path", "name", "é"]))}:{_random_value(rng, 1)}'
                          for _ in range(rng.randrange(5))) + "}"
    if rng.random() < 0.1:
        text = _random_value(rng, 0)
    data = text.encode("utf-8", "surrogatepass")
    return _mutate(rng, data) if rng.random() < 0.5 else data


def _run_driver(driver: Path, mode: bytes, inputs: list[bytes]) -> list[bytes]:
    payload = b"".join(mode + b"%08x" % len(d) + d for d in inputs)
    out = subprocess.run([str(driver)], input=payload, capture_output=True, check=True,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"}).stdout
    lines = out.split(b"\n")
    assert len(lines) == len(inputs) + 1, out[-500:]
    return lines[:-1]


def test_reader_agrees_with_python_json(json_driver: Path) -> None:
    rng = random.Random(20240601)
    inputs = [_random_input(rng) for _ in range(20000)]
    mismatches = []
    for data, got in zip(inputs, _run_driver(json_driver, b"P", inputs)):
        text = got.decode()
        want = _expected(data)
        agree = text.startswith("ERR ") if want is None else _reported(text) == want
        if not agree:
            mismatches.append((data, want, text))
    assert not mismatches, mismatches[:5]
    valid = sum(_expected(d) is not None for d in inputs)
    assert valid > 3000  # the inputs do exercise the accepting paths


def test_writer_always_writes_valid_json(json_driver: Path) -> None:
    rng = random.Random(7)
    inputs = [bytes(rng.randrange(1, 256) for _ in range(rng.randrange(30))) for _ in range(5000)]
    inputs += ["".join(chr(rng.randrange(1, 0x110000)) for _ in range(10)).encode("utf-8", "surrogatepass")
               for _ in range(2000)]
    for data, line in zip(inputs, _run_driver(json_driver, b"E", inputs)):
        value = json.loads(line.decode("utf-8"))  # valid UTF-8 and valid JSON, always
        try:
            assert value == data.decode("utf-8")
        except UnicodeDecodeError:
            assert "\ufffd" in value  # bytes that are not UTF-8 become U+FFFD
    (line,) = _run_driver(json_driver, b"E", [b'a"b\\c\n\t\x01\x7f'])
    assert line == b'"a\\"b\\\\c\\n\\t\\u0001\\u007f"'
