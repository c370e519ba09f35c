"""Every process of a service (docs/fleet.md): ps, apply/revert/unload/list/status over many
processes, idempotent results, with real processes and the real CLI.

- a pre-forking server (tests/programs/fleet_prefork.c: a master forks its workers after
  start): every process found and patched at once; a worker forked later inherits the patch;
- two instances of one program (the server example) plus one of another build: --all picks
  the build a patch is for, each process is reported on its own line, the exit status
  says all / some / none.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import fleet
from support.builds import ServerBuild
from support.cli import assert_one_error_line, cli
from support.fleet import Prefork, clean_env, json_lines
from support.procs import spawn
from support.servers import Server, assert_buggy, assert_fixed, start_server

from fentry_build.binary.patchinfo import read_patch
from fentry_build.client import control

WORKERS = 3
ORIGINAL, PATCHED = 2, 101  # fleet_answer(1) before and after fleet_prefork_patch


@pytest.fixture(scope="module")
def prefork_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fleet.prefork_build(tmp_path_factory)


@pytest.fixture
def prefork(prefork_build: tuple[Path, Path], tmp_path: Path) -> Iterator[Prefork]:
    srv = Prefork(prefork_build[0], WORKERS, tmp_path / "state")
    yield srv
    assert srv.stop() == 0, "the master did not stop cleanly"


def _pids(lines: list[dict[str, object]]) -> list[int]:
    return [int(str(line["pid"])) for line in lines]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ServerBuild:
    """The server example's builds for these tests only (conftest's are shared)."""
    return fleet.server_build(tmp_path_factory)


# ---- the pre-forking server ------------------------------------------------------------------


def test_ps_finds_the_master_and_every_worker(prefork: Prefork, prefork_build: tuple[Path, Path]) -> None:
    build_id = read_patch(prefork_build[1]).build_id
    for worker in prefork.workers:
        prefork.wait_value(worker, ORIGINAL)
    out = cli("ps", "--build-id", build_id, "--json")
    assert out.returncode == 0, out.stderr
    rows = json_lines(out.stdout)
    assert sorted(_pids(rows)) == sorted(prefork.pids)
    for row in rows:
        assert row["program"] == str(prefork_build[0])
        assert row["build_id"] == build_id
        assert row["how"] == "linked" and row["reachable"] is True
        assert row["mode"] in ("jump", "dispatch") and row["patches"] == []
    # The same rows by executable; the text form has one line per process.
    text = cli("ps", "--program", str(prefork_build[0]))
    assert text.returncode == 0, text.stderr
    body = text.stdout.splitlines()[1:]
    assert sorted(int(line.split()[0]) for line in body) == sorted(prefork.pids)
    assert all(line.rstrip().endswith("none") for line in body)


def test_ps_and_all_look_past_a_process_whose_name_is_not_utf8(
        prefork: Prefork, prefork_build: tuple[Path, Path], tmp_path: Path) -> None:
    """Every process of the host is looked at: one whose name and executable's path are not
    UTF-8 (/proc shows their bytes) is read like any other, not a traceback."""
    odd = os.fsencode(tmp_path) + b"/sl\xff\xfeep"
    with open("/bin/sleep", "rb") as src, open(odd, "wb") as dst:
        dst.write(src.read())
    os.chmod(odd, 0o755)
    sleeper = spawn([odd, b"300"])
    try:
        assert b"\xff\xfe" in Path(f"/proc/{sleeper.pid}/status").read_bytes().splitlines()[0]
        out = cli("ps", "--json")
        assert out.returncode == 0 and not out.stderr, out.stderr
        assert set(prefork.pids) <= set(_pids(json_lines(out.stdout)))
        listed = cli("status", "--all", "--program", str(prefork_build[0]), "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(_pids(json_lines(listed.stdout))) == sorted(prefork.pids)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_apply_all_patches_the_master_and_workers_and_new_workers_inherit_it(
        prefork: Prefork, prefork_build: tuple[Path, Path]) -> None:
    prog, patch = prefork_build
    info = read_patch(patch)
    missing = cli("ps", "--missing", str(patch), "--json")
    assert missing.returncode == 1
    assert sorted(_pids(json_lines(missing.stdout))) == sorted(prefork.pids)

    out = cli("apply", "--all", str(patch), "--json")  # --all alone: the build the patch is for
    assert out.returncode == 0, out.stderr
    lines = json_lines(out.stdout)
    assert sorted(_pids(lines)) == sorted(prefork.pids)
    assert all(line["ok"] is True and line["changed"] is True and line["name"] == info.name
               for line in lines), lines
    for worker in prefork.workers:
        prefork.wait_value(worker, PATCHED)
    for _ in range(2 * WORKERS):
        pid, value = prefork.ask()
        assert pid in prefork.workers and value == PATCHED

    done = cli("ps", "--missing", str(patch))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "has fleet_prefork_patch version" in done.stdout and info.sha256[:12] in done.stdout

    # A worker that dies is replaced by a fork of the patched master: it is patched from
    # its first instruction, with nobody applying anything to it.
    old = prefork.workers[0]
    os.kill(old, 9)
    new = prefork.next_worker()
    prefork.workers[0] = new
    prefork.wait_value(new, PATCHED)
    states = {p["name"]: (p["state"], p["sha256"]) for p in control.list_patches(new)["patches"]}
    assert states == {info.name: ("active", info.sha256)}
    assert cli("ps", "--missing", str(patch)).returncode == 0

    # Idempotent: the same version again changes nothing anywhere.
    again = cli("apply", "--all", str(patch), "--json")
    assert again.returncode == 0, again.stderr
    assert [line["changed"] for line in json_lines(again.stdout)] == [False] * len(prefork.pids)

    # Reverted everywhere at once by program; then reverting again is refused by each
    # process (exit 1: none succeeded), unless --if-applied says that is fine.
    rev = cli("revert", "--all", "--program", str(prog), info.name)
    assert rev.returncode == 0, rev.stderr
    assert sorted(int(line.split(":")[0].split()[1]) for line in rev.stdout.splitlines()) == \
        sorted(prefork.pids)
    assert all(line.endswith(f"reverted {info.name}") for line in rev.stdout.splitlines())
    for worker in prefork.workers:
        prefork.wait_value(worker, ORIGINAL)
    strict = cli("revert", "--all", "--program", str(prog), info.name, "--json")
    assert strict.returncode == 1
    assert all(line["ok"] is False for line in json_lines(strict.stdout))
    assert strict.stderr == f"fentry-build: revert failed in {len(prefork.pids)} of " \
                            f"{len(prefork.pids)} processes\n"
    lenient = cli("revert", "--all", "--program", str(prog), info.name, "--if-applied", "--json")
    assert lenient.returncode == 0, lenient.stderr
    assert all(line["ok"] is True and line["changed"] is False for line in json_lines(lenient.stdout))

    # unload over all of them; list over all of them shows nothing left.
    unl = cli("unload", "--all", "--build-id", info.build_id, info.name)
    assert unl.returncode == 0, unl.stdout + unl.stderr
    listed = cli("list", "--all", "--build-id", info.build_id, "--json")
    assert listed.returncode == 0
    assert all(line["patches"] == [] for line in json_lines(listed.stdout))
    assert prefork.alive()


def test_dry_run_says_what_would_change_and_changes_nothing(prefork: Prefork,
                                                           prefork_build: tuple[Path, Path]) -> None:
    _, patch = prefork_build
    out = cli("apply", "--all", str(patch), "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    assert all(line["changed"] is True and line["dry_run"] is True for line in json_lines(out.stdout))
    for worker in prefork.workers:
        prefork.wait_value(worker, ORIGINAL)
    assert all(control.list_patches(pid)["patches"] == [] for pid in prefork.pids)
    rev = cli("revert", "--all", "--build-id", read_patch(patch).build_id, "fleet_prefork_patch",
              "--dry-run", "--if-applied")
    assert rev.returncode == 0
    assert all(line.endswith("fleet_prefork_patch is not applied: nothing to do")
               for line in rev.stdout.splitlines())


# ---- two instances of one program, one of another ------------------------------------------


@pytest.fixture
def three(built: ServerBuild, started: list[Server]) -> list[Server]:
    """The server example twice and its other build (-O1, another build-id) once."""
    for binary in (built.binary, built.binary, built.other_binary):
        started.append(start_server(binary, "jump"))
    return started


def test_apply_all_picks_the_build_the_patch_is_for(built: ServerBuild, three: list[Server]) -> None:
    a, b, other = three
    fix = built.patches["fix_parse"]
    out = cli("apply", "--all", str(fix))
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == sorted(
        f"pid {s.pid}: applied fix_parse (1 function replaced)" for s in (a, b))
    assert_fixed(a)
    assert_fixed(b)
    assert_buggy(other)

    # ps: all three, by build; --missing of the other build's fix names the other process.
    rows = {r["pid"]: r for r in json_lines(cli("ps", "--program", str(built.binary), "--json").stdout)}
    assert set(rows) == {a.pid, b.pid}
    assert all([p["name"] for p in r["patches"]] == ["fix_parse"] for r in rows.values())
    other_rows = json_lines(cli("ps", "--program", str(built.other_binary), "--json").stdout)
    assert _pids(other_rows) == [other.pid] and other_rows[0]["patches"] == []
    assert other_rows[0]["build_id"] != rows[a.pid]["build_id"]
    miss = cli("ps", "--missing", str(built.other_fix), "--json")
    assert miss.returncode == 1
    assert _pids(json_lines(miss.stdout)) == [other.pid]


def test_each_process_is_reported_and_the_exit_status_says_some(built: ServerBuild,
                                                                three: list[Server]) -> None:
    a, b, other = three
    fix = built.patches["fix_parse"]
    out = cli("apply", "--pid", str(a.pid), "--pid", str(b.pid), "--pid", str(other.pid), str(fix),
              "--json")
    assert out.returncode == 3, out.stdout + out.stderr
    lines = {line["pid"]: line for line in json_lines(out.stdout)}
    assert lines[a.pid]["ok"] is True and lines[b.pid]["ok"] is True
    assert lines[other.pid]["ok"] is False and lines[other.pid]["code"] == "wrong_build"
    assert "another build" in str(lines[other.pid]["error"])
    assert out.stderr == "fentry-build: apply failed in 1 of 3 processes\n"
    assert_fixed(a)
    assert_buggy(other)  # the refusal changed nothing there

    # Text: one line each, the refusal named by pid; status of several: one block each.
    text = cli("revert", "--pid", str(a.pid), "--pid", str(other.pid), "fix_parse")
    assert text.returncode == 3
    first, second = text.stdout.splitlines()
    assert first == f"pid {a.pid}: reverted fix_parse"
    assert second.startswith(f"pid {other.pid}: error: revert fix_parse in pid {other.pid}: ")
    st = cli("status", "--pid", str(a.pid), "--pid", str(other.pid))
    assert st.returncode == 0
    assert st.stdout.splitlines()[0] == f"pid {a.pid}:"
    assert f"  pid:       {other.pid}" in st.stdout.splitlines()


def test_one_pid_prints_as_it_always_did(built: ServerBuild, three: list[Server]) -> None:
    a = three[0]
    out = cli("apply", "--pid", str(a.pid), str(built.patches["fix_parse"]))
    assert (out.returncode, out.stdout) == (0, "applied fix_parse (1 function replaced)\n")
    js = cli("list", "--pid", str(a.pid), "--json")
    assert js.stdout.count("\n") == 1 and '"pid"' not in js.stdout  # the reply itself, as before
    assert cli("revert", "--pid", str(a.pid), "fix_parse").stdout == "reverted fix_parse\n"
    gone = cli("revert", "--pid", str(a.pid), "fix_parse")
    assert_one_error_line(gone, f"revert fix_parse in pid {a.pid}")
    fine = cli("revert", "--pid", str(a.pid), "fix_parse", "--if-applied")
    assert (fine.returncode, fine.stdout) == (0, "fix_parse is not applied: nothing changed\n")


def test_an_unreachable_process_is_listed_with_the_reason(built: ServerBuild, tmp_path: Path) -> None:
    proc = subprocess.Popen([str(built.binary), "0"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=clean_env(FENTRY_CONTROL="0"), cwd=tmp_path)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"listening on")
        rows = json_lines(cli("ps", "--program", str(built.binary), "--json").stdout)
        row = next(r for r in rows if r["pid"] == proc.pid)
        assert row["reachable"] is False and row["mode"] is None
        assert "FENTRY_CONTROL=0" in str(row["error"]) or "off" in str(row["error"]), row
        text = cli("ps", "--program", str(built.binary)).stdout
        assert any(line.split()[0] == str(proc.pid) and "unreachable: " in line
                   for line in text.splitlines()[1:])
        # As a target of several: its own line, the others are still served.
        out = cli("status", "--pid", str(proc.pid), "--pid", str(os.getpid()), "--json")
        assert out.returncode == 1 and [line["ok"] for line in json_lines(out.stdout)] == [False, False]
        assert json_lines(out.stdout)[0]["code"] == "unreachable"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- what the command line refuses -----------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["revert", "--all", "fix"], "--all needs --program PATH or --build-id ID"),
    (["list", "--pid", "1", "--all", "--build-id", "ab"], "either --pid (one or more) or --all"),
    (["status", "--program", "/bin/true"], "add --all"),
    (["status"], "say which processes"),
    (["list", "--all", "--build-id", "xyz"], "is not a build-id"),
    (["list", "--all", "--build-id", "00" * 20], "no running process running build " + "00" * 20),
    (["ps", "--missing", "/etc/hostname"], "/etc/hostname is not a readable ELF"),
])
def test_a_selection_that_says_too_little_or_too_much_is_one_line(args: list[str], fragment: str) -> None:
    out = cli(*args)
    assert_one_error_line(out, fragment)
    assert out.returncode == 1 and out.stdout == ""


def test_apply_all_of_a_file_that_is_no_patch_asks_no_process(built: ServerBuild, tmp_path: Path) -> None:
    out = cli("apply", "--all", str(built.binary))
    assert_one_error_line(out, f"{built.binary} is not a fentry patch")
    lib = tmp_path / "notapatch.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), "-x", "c", "-"], input="int x;\n",
                   text=True, check=True)
    out = cli("apply", "--all", str(lib))
    assert_one_error_line(out, "defines no fentry_patch descriptor")
