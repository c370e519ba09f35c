"""The audit trail (docs/security.md, "The audit trail"): every apply, revert and unload -
accepted or refused, from the control socket, from the program itself and from
FENTRY_PATCHES - in the process's memory (the protocol's "history"), in FENTRY_AUDIT_LOG or
in syslog.  Real programs, real CLI, real syslog socket (a datagram socket mounted over
/dev/log in a private mount namespace).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fentry_build.client import control

from support.builds import PROGRAMS, ServerBuild, build_patch, build_program
from support.cli import cli
from support.servers import Server, assert_fixed, assert_stops_cleanly, start_server

needs_root = pytest.mark.needs_root


@pytest.fixture(scope="module")
def sitebytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tests/programs/sitebytes.c: applies and reverts its patch with fentry_apply()."""
    d = tmp_path_factory.mktemp("audit")
    prog = build_program([PROGRAMS / "sitebytes.c"], d / "sitebytes")
    patch = build_patch(prog, PROGRAMS / "sitebytes_patch.c", d / "sitebytes_patch.so")
    return prog, patch


@pytest.fixture
def logdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="faudit-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def history(pid: int) -> list[dict[str, Any]]:
    reply = control.request(pid, {"op": "history"})
    assert reply["ok"] is True and reply["dropped"] == 0 and reply["kept"] == 1000, reply
    entries: list[dict[str, Any]] = reply["history"]
    return entries


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["via"], e["op"], e["name"], e["ok"], e.get("code")) for e in entries]


def test_operations_accepted_and_refused_are_in_memory_and_in_the_log_file(
        built: ServerBuild, started: list[Server], logdir: Path) -> None:
    log = logdir / "audit.log"
    fix = built.patches["fix_parse"]
    srv = start_server(built.binary, "jump", {"FENTRY_AUDIT_LOG": str(log),
                                              "FENTRY_PATCHES": str(fix)})
    started.append(srv)
    assert_fixed(srv)
    pid = str(srv.pid)
    assert cli("revert", "--pid", pid, "fix_parse").returncode == 0
    assert cli("unload", "--pid", pid, "fix_parse").returncode == 0
    assert cli("apply", "--pid", pid, str(built.other_fix)).returncode == 1     # wrong build
    assert cli("apply", "--pid", pid, str(built.patches["rel_veto_patch"])).returncode == 1
    assert cli("revert", "--pid", pid, "nope").returncode == 1                  # no such patch
    assert cli("apply", "--pid", pid, str(fix)).returncode == 0
    assert cli("apply", "--pid", pid, str(fix)).returncode == 0                 # the same version:
    #                                                                              nothing changes
    assert cli("revert", "--pid", pid, "fix_parse").returncode == 0

    entries = history(srv.pid)
    assert summary(entries) == [
        ("start", "load", "fix_parse", True, None),
        ("socket", "revert", "fix_parse", True, None),
        ("socket", "unload", "fix_parse", True, None),
        ("socket", "load", "fix_parse", False, "wrong_build"),
        ("socket", "load", "rel_veto_patch", False, "callback_refused"),
        ("socket", "revert", "nope", False, "no_such_patch"),
        ("socket", "load", "fix_parse", True, None),
        ("socket", "load", "fix_parse", True, None),  # applied already: accepted, unchanged
        ("socket", "revert", "fix_parse", True, None),
    ]
    assert [e["seq"] for e in entries] == list(range(1, 10))
    assert all(e["peer_uid"] == os.geteuid() for e in entries)
    assert entries[0]["peer_pid"] == srv.pid  # FENTRY_PATCHES: the process itself
    assert all(e["peer_pid"] not in (0, srv.pid) for e in entries[1:])  # the CLI processes
    assert len({e["peer_pid"] for e in entries[1:]}) == 8  # one CLI process each
    assert entries[0]["path"] == str(fix) and entries[3]["path"] == str(built.other_fix)
    fix_sha = hashlib.sha256(fix.read_bytes()).hexdigest()
    assert [e["sha256"] for e in entries] == [
        fix_sha, fix_sha, fix_sha,  # loaded at start, reverted, unloaded
        hashlib.sha256(built.other_fix.read_bytes()).hexdigest(),  # read, then refused
        hashlib.sha256(built.patches["rel_veto_patch"].read_bytes()).hexdigest(),
        None,  # no such patch: no file
        fix_sha, fix_sha, fix_sha]
    assert "was built for another build" in entries[3]["error"]
    assert "pre-patch callback refused" in entries[4]["error"]
    assert entries[1]["path"] is None and "error" not in entries[1]
    assert all(entries[i]["time"] <= entries[i + 1]["time"] for i in range(len(entries) - 1))
    # fentry-build list --history shows the same, as JSON and as text.
    shown = cli("list", "--pid", pid, "--history", "--json")
    assert json.loads(shown.stdout)["history"] == entries
    text = cli("list", "--pid", pid, "--history").stdout.splitlines()
    assert len(text) == 9
    assert f"  apply fix_parse ({fix}" in text[0]
    assert text[0].endswith("  by FENTRY_PATCHES at start: done")
    assert "  apply fix_parse (" in text[3] and text[3].endswith(
        ": refused (wrong_build): " + entries[3]["error"])
    # The file holds the same entries, one JSON object per line, naming the process.
    lines = log_lines(log)
    assert [{k: v for k, v in line.items() if k not in ("process", "program")}
            for line in lines] == entries
    assert {(line["process"], line["program"]) for line in lines} == {(srv.pid, str(built.binary))}
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)
    assert_stops_cleanly(srv)


def test_the_hash_of_the_loaded_file_is_the_same_in_the_reply_list_and_trail(
        built: ServerBuild, started: list[Server]) -> None:
    srv = start_server(built.binary, "dispatch")
    started.append(srv)
    fix = built.patches["fix_parse"]
    reply = control.apply(srv.pid, fix)
    (listed,) = control.list_patches(srv.pid)["patches"]
    (entry,) = history(srv.pid)
    # The loader's SHA-256 of the copy it loaded: the file's, wherever it is shown.
    assert reply["sha256"] == listed["sha256"] == entry["sha256"] == \
        hashlib.sha256(fix.read_bytes()).hexdigest()
    control.revert(srv.pid, "fix_parse")
    assert history(srv.pid)[-1]["sha256"] == entry["sha256"]  # revert names the same file
    assert_stops_cleanly(srv)


def test_in_process_calls_are_audited_as_the_process_itself(
        sitebytes: tuple[Path, Path], logdir: Path) -> None:
    prog, patch = sitebytes
    log = logdir / "audit.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    result = subprocess.run([str(prog), str(patch)], env={**env, "FENTRY_AUDIT_LOG": str(log)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    lines = log_lines(log)
    assert [(e["via"], e["op"], e["name"], e["path"], e["ok"]) for e in lines] == [
        ("api", "load", "sitebytes_patch", str(patch), True),
        ("api", "revert", "sitebytes_patch", None, True),
    ]
    sha = hashlib.sha256(patch.read_bytes()).hexdigest()
    assert [e["sha256"] for e in lines] == [sha, sha]
    (pid,) = {e["process"] for e in lines}
    assert all((e["peer_pid"], e["peer_uid"], e["program"]) == (pid, os.geteuid(), str(prog))
               for e in lines)


@pytest.mark.parametrize("bad", ["group-writable", "symlink", "folder"])
def test_a_log_file_that_fails_the_checks_is_not_written(
        sitebytes: tuple[Path, Path], logdir: Path, bad: str) -> None:
    prog, patch = sitebytes
    log = logdir / "audit.log"
    if bad == "group-writable":
        log.write_text("")
        log.chmod(0o620)
    elif bad == "symlink":
        (logdir / "elsewhere").write_text("")
        log.symlink_to(logdir / "elsewhere")
    else:
        log.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    result = subprocess.run([str(prog), str(patch)], env={**env, "FENTRY_AUDIT_LOG": str(log)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result  # the program runs; its patch applies
    (line,) = result.stderr.splitlines()
    assert line.startswith("fentry: FENTRY_AUDIT_LOG: ") and "the audit trail goes to syslog" in line
    if bad != "folder":
        assert (logdir / ("audit.log" if bad == "group-writable" else "elsewhere")).read_text() == ""


@needs_root
def test_the_trail_goes_to_syslog_by_default(sitebytes: tuple[Path, Path], logdir: Path) -> None:
    """A datagram socket of ours stands in for /dev/log in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    prog, patch = sitebytes
    logdir.chmod(0o755)
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(logdir / "log"))
    sink.settimeout(30)
    script = (f"mount -t tmpfs tmpfs /dev && touch /dev/log && mount --bind {logdir}/log /dev/log"
              f" && exec {prog} {patch}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    messages = [sink.recv(4096).decode() for _ in range(2)]
    sink.close()
    # <29> = LOG_DAEMON (3 << 3) | LOG_NOTICE (5); the ident is the program's own name.
    for message, what in zip(messages, ("load sitebytes_patch", "revert sitebytes_patch")):
        assert message.startswith("<29>"), message
        assert " sitebytes: fentry: process " in message, message
        assert f": {what} (" in message and "via api: done" in message, message
    assert str(patch) in messages[0]
