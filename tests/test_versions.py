"""A corrected patch just applies (issue 13 §2).

Applying a new build of a patch that is loaded under the same name replaces the old
version in one publish - no request ever sees neither version - and the old version is
unloaded at once when no thread can be running it, else kept as "replaced" for a later
`unload`.  The version that is active already applies again with nothing changed.
`revert` and `unload` take the name, the file name or the path applied; an unknown name
gets the list of what is loaded.  Real server, real CLI, both modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from support.builds import PROGRAMS, ServerBuild, build_patch, build_program
from support.cli import CLI, CLI_TIMEOUT, cli, package_env
from support.servers import (BUG_REQUEST, FIXED, LOWER, LOWER_OLD, LOWER_V2, MODES,
                             Server, ask, assert_buggy, assert_fixed, assert_v2, start_server)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ok(*args: str) -> dict[str, object]:
    out = cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    reply: dict[str, object] = json.loads(out.stdout)
    return reply


def listing(pid: int) -> list[tuple[object, object, object]]:
    patches = ok("list", "--pid", str(pid))["patches"]
    assert isinstance(patches, list)
    return [(p["name"], p["state"], p["sha256"]) for p in patches]


def deploy(source: Path, dest: Path) -> Path:
    """What a build or a deploy does: a new file at the same path (write, then rename)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(source, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, dest)
    return dest


@pytest.mark.parametrize("mode", MODES)
def test_a_new_build_of_a_patch_replaces_the_old_one_in_one_step_under_load(
        built: ServerBuild, tmp_path: Path, started: list[Server], mode: str) -> None:
    """fix_parse and fix_parse_v2 both fix the 8-number SUM; only v2 reads lower case.
    Deployed in turn at the same path, each apply is a new version of patch fix_parse;
    clients asking the fixed request meanwhile never get the bug's answer."""
    v1, v2 = built.patches["fix_parse"], built.patches["fix_parse_v2"]
    path = tmp_path / "fix_parse.so"
    srv = start_server(built.binary, mode)
    started.append(srv)
    pid = str(srv.pid)
    reply = ok("apply", "--pid", pid, str(deploy(v1, path)))
    assert (reply["changed"], reply.get("replaced")) == (True, None)
    assert_fixed(srv)

    answers: Counter[str] = Counter()
    stop = threading.Event()

    def ask_all_the_time() -> None:
        while not stop.is_set():
            answers[ask(srv.port, BUG_REQUEST)] += 1

    clients = [threading.Thread(target=ask_all_the_time) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        versions = [v2, v1] * 10
        for source in versions:
            reply = ok("apply", "--pid", pid, str(deploy(source, path)))
            old = v1 if source is v2 else v2
            assert reply["changed"] is True and reply["sha256"] == sha256(source)
            replaced = reply["replaced"]
            assert isinstance(replaced, dict) and replaced["sha256"] == sha256(old), reply
            assert ask(srv.port, LOWER) == (LOWER_V2 if source is v2 else LOWER_OLD)
            states = listing(srv.pid)
            assert ("fix_parse", "active", sha256(source)) in states
            assert all(s != "active" or h == sha256(source) for _, s, h in states), states
    finally:
        stop.set()
        for c in clients:
            c.join()
    print(f"{mode}: {sum(answers.values())} answers during {len(versions)} replacements: "
          f"{dict(answers)}")
    assert set(answers) == {FIXED} and sum(answers.values()) > 0
    assert_fixed(srv)
    # The text a person reads.
    text = cli("apply", "--pid", pid, str(deploy(v2, path)))
    assert text.returncode == 0
    assert text.stdout.startswith(f"applied fix_parse version {sha256(v2)[:12]} (1 function), "
                                  f"replacing version {sha256(v1)[:12]} in one step; ")
    assert_v2(srv)


@pytest.mark.parametrize("mode", MODES)
def test_applying_the_active_version_again_changes_nothing(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    pid, fix = str(srv.pid), built.patches["fix_parse"]
    first = ok("apply", "--pid", pid, str(fix))
    before = ok("list", "--pid", pid)
    again = ok("apply", "--pid", pid, str(fix))
    assert (first["changed"], again["changed"]) == (True, False)
    assert again["sha256"] == first["sha256"] == sha256(fix) and "replaced" not in again
    assert ok("list", "--pid", pid) == before  # not even applied_at moved
    text = cli("apply", "--pid", pid, str(fix))
    assert text.returncode == 0, text.stderr
    assert text.stdout == (f"fix_parse is already applied (version {sha256(fix)[:12]}): "
                           "nothing changed\n")
    assert_fixed(srv)
    # Reverted, the same version applies again: re-activated, not loaded twice.
    ok("revert", "--pid", pid, "fix_parse")
    assert_buggy(srv)
    assert ok("apply", "--pid", pid, str(fix))["changed"] is True
    assert listing(srv.pid) == [("fix_parse", "active", sha256(fix))]
    assert_fixed(srv)


@pytest.mark.parametrize("mode", MODES)
def test_revert_and_unload_take_the_name_the_file_name_or_the_path_applied(
        built: ServerBuild, tmp_path: Path, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    pid, fix = str(srv.pid), built.patches["fix_parse"]
    for spelling in ("fix_parse", "fix_parse.so", str(fix)):
        ok("apply", "--pid", pid, str(fix))
        assert_fixed(srv)
        assert ok("revert", "--pid", pid, spelling)["ok"] is True
        assert_buggy(srv)
        assert ok("unload", "--pid", pid, spelling)["ok"] is True
        assert listing(srv.pid) == []
    # A relative path is the file applied too (the CLI makes it absolute, as apply does).
    ok("apply", "--pid", pid, str(fix))
    out = subprocess.run([*CLI, "revert", "--pid", pid, f"./{fix.name}"], cwd=fix.parent,
                         capture_output=True, text=True, timeout=CLI_TIMEOUT, env=package_env())
    assert (out.returncode, out.stdout) == (0, "reverted fix_parse\n"), out

    ok("apply", "--pid", pid, str(fix))
    wrong = cli("revert", "--pid", pid, "nope")
    assert wrong.returncode != 0 and wrong.stderr == (
        f"fentry-build: error: revert nope in pid {pid}: no patch named nope is loaded; "
        "loaded: fix_parse (active)\n")
    elsewhere = tmp_path / "fix_parse.so"
    wrong = cli("unload", "--pid", pid, str(elsewhere))
    assert wrong.returncode != 0
    assert f"no patch was applied from {elsewhere}; loaded: fix_parse (active)" in wrong.stderr
    wrong = cli("unload", "--pid", pid, "fix_parse.so")
    assert "patch fix_parse is applied; revert it before unloading it" in wrong.stderr
    assert_fixed(srv)


@pytest.fixture(scope="module")
def parked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """tests/programs/parked.c and two versions of its patch (x + 100, x + 200)."""
    d = tmp_path_factory.mktemp("parked")
    prog = build_program([PROGRAMS / "parked.c"], d / "parked")
    (d / "v1").mkdir()
    (d / "v2").mkdir()
    v1 = build_patch(prog, PROGRAMS / "parked_patch.c", d / "v1" / "parked_patch.so")
    v2 = build_patch(prog, PROGRAMS / "parked_patch.c", d / "v2" / "parked_patch.so",
                     cflags=["-DPARK_ADD=200"])
    return prog, v1, v2


@pytest.mark.parametrize("mode", MODES)
def test_an_old_version_a_thread_still_runs_stays_loaded_as_replaced_until_unload(
        parked: tuple[Path, Path, Path], tmp_path: Path, mode: str) -> None:
    prog, v1, v2 = parked
    release = tmp_path / "release"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_RUNTIME_DIR": str(tmp_path / "run"),
                "PARK_RELEASE": str(release), "PARK_ANNOUNCE": "1"})
    proc = subprocess.Popen([str(prog)], stdout=subprocess.PIPE, text=True, env=env)
    path = tmp_path / "parked_patch.so"
    run_env = {"FENTRY_RUNTIME_DIR": str(tmp_path / "run")}
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        assert proc.stdout.readline() == "park returned 1\n"
        pid = str(proc.pid)
        assert cli("apply", "--pid", pid, str(deploy(v1, path)), env_extra=run_env).returncode == 0
        # The parker thread calls park() again (once a second) and waits inside version 1.
        while (line := proc.stdout.readline()) != "inside version 1\n":
            assert line == "park returned 1\n", line
        out = cli("apply", "--pid", pid, str(deploy(v2, path)), "--json", env_extra=run_env)
        assert out.returncode == 0, out.stderr
        replaced = json.loads(out.stdout)["replaced"]
        assert replaced["sha256"] == sha256(v1) and replaced["unloaded"] is False
        assert replaced["why"].startswith("busy: thread"), replaced
        states = json.loads(cli("list", "--pid", pid, "--json", env_extra=run_env).stdout)
        assert [(p["state"], p["sha256"]) for p in states["patches"]] == [
            ("replaced", sha256(v1)), ("active", sha256(v2))]
        text = cli("list", "--pid", pid, env_extra=run_env).stdout
        assert "parked_patch  replaced by a newer version (still loaded)  version " \
               f"{sha256(v1)[:12]}" in text
        busy = cli("unload", "--pid", pid, "parked_patch", env_extra=run_env)
        assert busy.returncode != 0 and "busy: thread" in busy.stderr

        release.touch()  # the thread leaves version 1; its next call runs version 2
        assert proc.stdout.readline() == "park returned 101\n"
        assert proc.stdout.readline() == "inside version 2\n"
        assert proc.stdout.readline() == "park returned 201\n"
        deadline = time.monotonic() + 30
        while True:
            out = cli("unload", "--pid", pid, "parked_patch", env_extra=run_env)
            if out.returncode == 0:
                break
            assert "busy" in out.stderr and time.monotonic() < deadline, out.stderr
            time.sleep(0.2)  # a stale return address may linger
        states = json.loads(cli("list", "--pid", pid, "--json", env_extra=run_env).stdout)
        assert [(p["state"], p["sha256"]) for p in states["patches"]] == [("active", sha256(v2))]
        assert "/memfd:fentry:parked_patch.so" in Path(f"/proc/{pid}/maps").read_text()
        assert proc.stdout.readline() == "inside version 2\n"
        assert proc.stdout.readline() == "park returned 201\n"
    finally:
        proc.kill()
        proc.wait()
