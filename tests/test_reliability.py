"""Reliability of live patching: under load, when things go wrong, and beside a debugger.

Everything is real: the server example (examples/server: 4 worker threads, a line
protocol, the bug in parse_request, patches/fix_parse.c) built from its sources with the
real shim and the real generator, its TCP clients, the control socket, fork/exec, gdb and
the kernel's uprobes.  Every test runs in jump mode (the default) and in dispatch mode
(FENTRY_MODE=dispatch) and is bounded in time.

The figures (cycles, requests, failures) are printed - run pytest with -s to see them -
and recorded in docs/security.md.  tests/test_security.py and tests/test_fuzz.py use
the helpers of the first two sections.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from fentry_build.client import control
from fentry_build.errors import FentryError

from support.builds import PROGRAMS, ServerBuild, build_rel_patch, build_rel_program
from support.cli import CLI, assert_one_error_line
from support.servers import (
    BUG_REQUEST,
    BUGGY,
    MODES,
    Server,
    ask,
    assert_buggy,
    assert_coherent,
    assert_fixed,
    assert_stops_cleanly,
    figures,
    patch_states,
    raw_connect,
    start_server,
    wait_until_quiet,
)

pytestmark = [pytest.mark.stress]  # load, faults, debuggers, uprobes: minutes

# ---- running the server ----------------------------------------------------------------


# ---- under load ---------------------------------------------------------------------------

LOAD_CYCLES = 1000
LOAD_THREADS = 4  # one per server worker: 3 keep their connection, 1 reconnects every time


@pytest.mark.parametrize("mode", MODES)
def test_1000_apply_revert_cycles_under_load_answer_only_old_or_new(
        built: ServerBuild, loadclient: Path, started: list[Server], tmp_path: Path,
        mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    fix = built.patches["fix_parse"]
    phase_file = tmp_path / "phase"
    phase_file.write_bytes(bytes(16))
    with open(phase_file, "r+b") as f, mmap.mmap(f.fileno(), 16) as shared, \
            memoryview(shared).cast("Q") as words:
        # One aligned 8-byte store each (struct.pack_into zero-fills first: a reader
        # could see 0 in between).
        def phase(value: int) -> None:
            words[0] = value

        client = subprocess.Popen([str(loadclient), str(srv.port), str(LOAD_THREADS),
                                   str(phase_file), "120"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None and client.stdout.readline() == "started\n"
            time.sleep(0.1)
            begin = time.monotonic()
            for cycle in range(LOAD_CYCLES):
                p = 4 * cycle
                phase(p + 1)
                assert control.apply(srv.pid, fix)["ok"]
                phase(p + 2)
                if cycle % 10 == 0:
                    time.sleep(0.002)  # let the clients see the patch in effect for a while
                phase(p + 3)
                assert control.revert(srv.pid, "fix_parse")["ok"]
                phase(p + 4)
                if cycle % 10 == 0:
                    time.sleep(0.002)
            elapsed = time.monotonic() - begin
            time.sleep(0.1)
        finally:
            words[1] = 1
            out, err = client.communicate(timeout=60)
    counts = {k: int(v) for k, v in (kv.split("=") for kv in out.split()[-6:])}
    figures(f"under load ({mode})", cycles=LOAD_CYCLES, seconds=f"{elapsed:.1f}",
            client_threads=LOAD_THREADS, **counts)
    assert client.returncode == 0, err
    assert counts["wrong"] == 0 and counts["stale"] == 0 and counts["failed"] == 0, err
    assert counts["requests"] > 10 * LOAD_CYCLES
    assert counts["old"] > 0 and counts["new"] > 0  # both behaviours were seen
    assert patch_states(srv) == {"fix_parse": "reverted"}
    assert_buggy(srv)
    assert_stops_cleanly(srv)


# ---- clients that go away ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_clients_that_leave_mid_request_leave_the_process_consistent(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    sock = control.socket_path(srv.pid)
    load = json.dumps({"op": "load", "path": str(built.patches["fix_parse"])}).encode() + b"\n"
    revert = b'{"op": "revert", "name": "fix_parse"}\n'
    rng = random.Random(20240601)
    resets = 0
    for i in range(200):
        s = raw_connect(sock)
        s.sendall(load if i % 2 == 0 else revert)
        if rng.random() < 0.5:  # close with a reset instead of a FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            resets += 1
        if rng.random() < 0.3:
            time.sleep(0.001)
        s.close()
    wait_until_quiet(srv)
    state = assert_coherent(srv)
    # The same patch applies again, or is already applied - never "half" applied.
    try:
        control.apply(srv.pid, built.patches["fix_parse"])
    except FentryError as e:
        assert state == "active" and "already applied" in str(e), (state, e)
    assert_fixed(srv)
    control.revert(srv.pid, "fix_parse")
    assert assert_coherent(srv) == "reverted"
    figures(f"clients gone mid-request ({mode})", connections=200, resets=resets,
            final_state=state)
    assert_stops_cleanly(srv)


def wait_for_a_socket(pid: int, seconds: float = 10) -> bool:
    """Until process `pid` has a socket open (the CLI connected to the control channel)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if any(os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("mode", MODES)
def test_the_cli_killed_while_it_waits_leaves_the_process_consistent(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode, {"FENTRY_CALLBACK_TIMEOUT_MS": "1500"})
    started.append(srv)
    # The hung pre-patch callback keeps the CLI waiting 1.5 s: kill -9 it meanwhile.
    cli = subprocess.Popen([*CLI, "apply", "--pid", str(srv.pid),
                            str(built.patches["rel_hang_patch"])],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for_a_socket(cli.pid), "the CLI never connected"
    time.sleep(0.2)  # it has sent its request and waits for the reply
    cli.kill()
    cli.wait()
    # ... and at random moments of apply and revert of a patch that loads at once.
    rng = random.Random(7)
    kills = 1
    for i in range(8):
        verb = ["apply", "--pid", str(srv.pid), str(built.patches["fix_parse"])] if i % 2 == 0 \
            else ["revert", "--pid", str(srv.pid), "fix_parse"]
        cli = subprocess.Popen([*CLI, *verb], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.05, 0.6))
        if cli.poll() is None:
            cli.kill()
            kills += 1
        cli.wait()
    time.sleep(1.6)  # the hung callback's time limit has passed
    wait_until_quiet(srv)
    state = assert_coherent(srv)
    assert "rel_hang_patch" not in patch_states(srv)
    if state != "active":
        control.apply(srv.pid, built.patches["fix_parse"])
    assert_fixed(srv)
    figures(f"CLI killed while waiting ({mode})", kills=kills, final_state=state)
    assert_stops_cleanly(srv)


# ---- callbacks that refuse or hang --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_pre_patch_callback_that_refuses_leaves_nothing_applied(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    veto = built.patches["rel_veto_patch"]
    with pytest.raises(FentryError, match="pre-patch callback refused: rel_veto_patch: the "
                       "service is draining, try later; nothing applied"):
        control.apply(srv.pid, veto)
    result = subprocess.run([*CLI, "apply", "--pid", str(srv.pid), str(veto)],
                            capture_output=True, text=True, timeout=60)
    assert_one_error_line(result, "refused: rel_veto_patch: the service is draining")
    assert patch_states(srv) == {}
    assert_buggy(srv)  # its replacement ("ERR rel_veto_patch ran") never ran
    control.apply(srv.pid, built.patches["fix_parse"])  # the channel and the loader still work
    assert_fixed(srv)
    assert_stops_cleanly(srv)


@pytest.mark.parametrize("mode", MODES)
def test_a_pre_patch_callback_that_hangs_times_out_and_leaves_nothing_applied(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode, {"FENTRY_CALLBACK_TIMEOUT_MS": "500"})
    started.append(srv)
    hang = built.patches["rel_hang_patch"]
    outcome: list[BaseException | None] = []

    def apply_hung() -> None:
        try:
            control.apply(srv.pid, hang)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the main thread looks at it
            outcome.append(e)

    begin = time.monotonic()
    t = threading.Thread(target=apply_hung)
    t.start()
    time.sleep(0.2)
    assert ask(srv.port, BUG_REQUEST) == BUGGY  # the program serves while the callback hangs
    t.join(timeout=30)
    waited = time.monotonic() - begin
    assert not t.is_alive()
    (error,) = outcome
    assert isinstance(error, FentryError), error
    assert "its pre-patch callback did not return within 500 ms; nothing applied" in str(error)
    # At least the time limit; far less than the callback's own hang (forever) and the
    # 30 s join - a generous bound, not a speed requirement.
    assert 0.45 < waited < 25, waited
    assert control.status(srv.pid)["patches_active"] == 0  # the channel answers at once
    assert patch_states(srv) == {}
    assert_buggy(srv)
    with pytest.raises(FentryError, match="did not return within 500 ms"):  # again: same
        control.apply(srv.pid, hang)
    control.apply(srv.pid, built.patches["fix_parse"])
    assert_fixed(srv)
    figures(f"hung pre-patch callback ({mode})", timeout_ms=500, waited_s=f"{waited:.2f}")
    assert_stops_cleanly(srv)


# ---- fork, exec and exit while patches come and go ------------------------------------------------


@pytest.fixture(scope="module")
def forker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("forker")
    prog = build_rel_program([PROGRAMS / "rel_forker.c"], d / "rel_forker")
    return prog, build_rel_patch(prog, PROGRAMS / "rel_forker_patch.c", d)


def _run_forker(prog: Path, patch: Path, mode: str, seconds: float) -> dict[str, int]:
    """Apply and revert over the control socket until rel_forker exits by itself."""
    rundir = Path(tempfile.mkdtemp(prefix="frel-", dir="/tmp"))  # exec'd children leave sockets
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_RUNTIME_DIR": str(rundir), "FENTRY_MODE": mode})
    proc = subprocess.Popen([str(prog), str(seconds), shutil.which("true") or "/bin/true"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    applied = reverted = 0
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        deadline = time.monotonic() + seconds + 30
        while proc.poll() is None:
            assert time.monotonic() < deadline, "rel_forker did not finish: a deadlock?"
            try:
                control.apply(proc.pid, patch)
                applied += 1
                control.revert(proc.pid, "rel_forker_patch")
                reverted += 1
            except FentryError as e:
                # Only because it is exiting: gone, or its channel closed under us.
                time.sleep(0.05)
                assert proc.poll() is not None, f"refused while alive: {e}"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert err == "", err
    counts = {k: int(v) for k, v in (kv.split("=") for kv in out.split())}
    counts.update(applied=applied, reverted=reverted)
    return counts


@pytest.mark.parametrize("mode", MODES)
def test_fork_exec_and_exit_while_patches_are_applied_and_reverted(
        forker: tuple[Path, Path], mode: str) -> None:
    prog, patch = forker
    counts = _run_forker(prog, patch, mode, 3.0)
    figures(f"fork/exec/exit ({mode})", **counts)
    assert counts["bad_children"] == 0 and counts["wrong"] == 0
    assert counts["forks"] > 50 and counts["execs"] > 10 and counts["applied"] > 50
    assert counts["new"] > 0  # the patch was in effect in the parent at times
    # Short runs: the process exits while the test is applying or reverting.
    for seconds in (0.15, 0.25, 0.35, 0.45):
        short = _run_forker(prog, patch, mode, seconds)
        assert short["bad_children"] == 0 and short["wrong"] == 0, short


# ---- gdb ----------------------------------------------------------------------------------------

GDB = shutil.which("gdb")
needs_gdb = pytest.mark.needs_gdb

def gdb_command(commands: list[str], args: list[str]) -> list[str]:
    """A gdb -batch invocation as a user would type it, that cannot wait for input.

    -nx: no ~/.gdbinit.  debuginfod off: no network look-ups (and no question).  stdin is
    /dev/null and the caller kills it on a timeout.  A gdb that runs the program while a
    patch loads reads the patch's name at that moment as /proc/self/fd/N (the shim's
    private copy, docs/security.md) and cannot open it; `sharedlibrary` after a stop reads
    the name the patch carries once loaded - its path - and its symbols from there.
    """
    argv = [GDB or "gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off"]
    for c in commands:
        argv += ["-ex", c]
    return argv + ["--args", *args]


def run_gdb(argv: list[str], env: dict[str, str], timeout: float = 60) -> str:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            env=env, timeout=timeout)  # a timeout kills gdb with SIGKILL
    return result.stdout + result.stderr


def program_env(mode: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0", **extra})
    return env


def frames(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"#\d+ ", line)]


@pytest.fixture(scope="module")
def crash_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("crash")
    prog = build_rel_program([PROGRAMS / "rel_crash.c"], d / "rel_crash")
    return prog, build_rel_patch(prog, PROGRAMS / "rel_crash_patch.c", d)


@needs_gdb
@pytest.mark.parametrize("mode", MODES)
def test_a_crashing_replacement_is_named_with_its_patch_in_gdbs_backtrace(
        crash_build: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    prog, patch = crash_build
    env = program_env(mode, FENTRY_PATCHES=str(patch))
    plain = subprocess.run([str(prog)], env=env, capture_output=True, text=True, timeout=30)
    assert plain.returncode == -signal.SIGSEGV  # the patch author's bug: a NULL dereference
    out = run_gdb(gdb_command(["run", "sharedlibrary", "bt", "info symbol $pc", "kill"],
                              [str(prog)]), env)
    assert "Program received signal SIGSEGV" in out, out
    bt = frames(out)
    assert bt and "rel_lookup_broken" in bt[0] and "rel_crash_patch.c" in bt[0], out
    assert len(bt) >= 3 and "rel_caller" in bt[1] and "main" in bt[2], out
    assert f"rel_lookup_broken in section .text of {patch}" in out, out


def _dl_names(prog: Path, patch: Path) -> list[str]:
    out = subprocess.run([str(prog), "an", str(patch)], env=program_env("dispatch"),
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("object ")]


@needs_gdb
def test_gdb_running_the_program_while_a_patch_loads_neither_hangs_nor_misses_it(
        gdb_build: tuple[Path, Path]) -> None:
    """What a user types.  While it loads, the patch is named /proc/self/fd/N, which gdb
    resolves in its own process: N is a descriptor gdb does not have (a warning, never a
    hang on one of gdb's pipes); once loaded the patch is named by its path, which
    `sharedlibrary` reads."""
    prog, patch = gdb_build
    names = _dl_names(prog, patch)
    assert str(patch) in names and not any(n.startswith("/proc/") for n in names), names
    out = run_gdb(gdb_command(["break rel_stop", "run", "sharedlibrary", "break rel_target_new",
                               "continue", "bt", "continue"],
                              [str(prog), "asc", str(patch)]), program_env("jump"), timeout=30)
    bt = frames(out)
    assert len(bt) >= 2 and "rel_target_new" in bt[0] and "rel_caller" in bt[1], out
    assert "result 202" in out and "exited normally" in out, out


@needs_gdb
@pytest.mark.parametrize("mode", MODES)
def test_gdb_attaching_to_a_patched_process_finds_the_patch_symbols_by_itself(
        gdb_build: tuple[Path, Path], mode: str) -> None:
    prog, patch = gdb_build
    proc = subprocess.Popen([str(prog), "aw", str(patch)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=program_env(mode))
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "apply ok\n"
        assert proc.stdout.readline() == "waiting\n"
        out = run_gdb([GDB or "gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off",
                       "-p", str(proc.pid), "-ex", "info symbol rel_target_new",
                       "-ex", "info line rel_target_new", "-ex", "detach"],
                      program_env(mode), timeout=30)
        assert f"rel_target_new in section .text of {patch}" in out, out
        assert "rel_gdb_patch.c" in out, out
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


@needs_gdb
@pytest.mark.parametrize("mode", MODES)
def test_apply_refuses_an_entry_holding_a_debugger_breakpoint_and_leaves_it_there(
        gdb_build: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    prog, patch = gdb_build
    # Stopped at rel_stop, gdb puts a breakpoint on rel_target's first byte; the program
    # then applies a patch of rel_target in-process, and calls it.
    out = run_gdb(gdb_command(["break rel_stop", "run", "break *rel_target", "continue", "bt",
                               "continue"],
                              [str(prog), "sac", str(patch)]), program_env(mode))
    assert re.search(r"apply failed: patch rel_gdb_patch: rel_target: the bytes at its entry "
                     r"differ .*\(a breakpoint or another tool changed them\?\)", out), out
    assert re.search(r"Breakpoint 2, .*rel_target", out), out  # still there, and it fires
    bt = frames(out)
    assert len(bt) >= 2 and "rel_target" in bt[0] and "rel_caller" in bt[1], out
    assert "result 4" in out and "exited normally" in out, out


@needs_gdb
@pytest.mark.parametrize("mode", MODES)
def test_a_patched_program_runs_under_gdb_and_bt_in_the_replacement_shows_its_caller(
        gdb_build: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    prog, patch = gdb_build
    out = run_gdb(gdb_command(["break rel_stop", "run", "sharedlibrary",
                               "break rel_target_new", "break *rel_target", "continue", "bt",
                               "continue", "bt", "continue"],
                              [str(prog), "asc", str(patch)]), program_env(mode))
    assert "apply ok" in out, out
    # A breakpoint on the patched entry (in jump mode: over the jump) fires, then the call
    # goes on into the replacement.
    assert re.search(r"Breakpoint 3, .*rel_target \(", out), out
    assert re.search(r"Breakpoint 2, .*rel_target_new \(", out), out
    bt = frames(out)
    replacement = [i for i, line in enumerate(bt) if "rel_target_new" in line]
    assert replacement and len(bt) >= replacement[0] + 3, out
    assert "rel_caller" in bt[replacement[0] + 1] and "main" in bt[replacement[0] + 2], out
    assert "result 202" in out and "exited normally" in out, out


@needs_gdb
@pytest.mark.parametrize("mode", ["jump", "dispatch"])
def test_revert_with_a_breakpoint_on_the_patched_entry_keeps_the_program_correct(
        gdb_build: tuple[Path, Path], tmp_path: Path, mode: str) -> None:
    prog, patch = gdb_build
    # gdb's breakpoint on rel_target's entry is inserted while the patch is in effect; the
    # program reverts the patch, stops (gdb removes its breakpoints, then re-inserts them)
    # and calls rel_target twice.
    out = run_gdb(gdb_command(["break rel_stop", "run", "break *rel_target", "continue",
                               "continue", "continue", "continue", "continue", "continue"],
                              [str(prog), "asrscc", str(patch)]), program_env(mode))
    assert "apply ok" in out, out
    assert "SIGSEGV" not in out and "SIGILL" not in out, out
    # Either the revert is refused (a breakpoint sits on the site) and the patch stays in
    # effect, or it is done and the breakpoint survives it; never a crash.
    expected = "result 4" if "revert ok" in out else "result 202"
    assert out.count(expected) == 2 and "exited normally" in out, out


# ---- uprobes ------------------------------------------------------------------------------------


class Uprobes:
    """The kernel's uprobe_events interface (tracefs), mounted for the test if need be."""

    def __init__(self, tracefs: Path, mounted: bool) -> None:
        self.tracefs = tracefs
        self.mounted = mounted

    def write(self, rel: str, text: str) -> None:
        fd = os.open(self.tracefs / rel, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def add(self, event: str, binary: Path, offset: int) -> None:
        self.write("uprobe_events", f"p:fentry_rel/{event} {binary}:{offset:#x}\n")
        self.write(f"events/fentry_rel/{event}/enable", "1")

    def remove(self, event: str) -> None:
        try:
            self.write(f"events/fentry_rel/{event}/enable", "0")
        except OSError:
            pass
        self.write("uprobe_events", f"-:fentry_rel/{event}\n")


def _find_uprobes() -> Uprobes | str:
    for d in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing")):
        if (d / "uprobe_events").exists():
            return Uprobes(d, False)
    if os.geteuid() != 0:
        return "uprobes need root (tracefs)"
    d = Path("/sys/kernel/tracing")
    mounted = subprocess.run(["mount", "-t", "tracefs", "nodev", str(d)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        return f"tracefs cannot be mounted: {mounted.stderr.strip()}"
    if not (d / "uprobe_events").exists():
        subprocess.run(["umount", str(d)], capture_output=True)
        return "the kernel has no uprobe_events (CONFIG_UPROBE_EVENTS off)"
    return Uprobes(d, True)


@pytest.fixture(scope="module")
def uprobes() -> Iterator[Uprobes]:
    found = _find_uprobes()
    if isinstance(found, str):
        pytest.skip(f"no uprobes here: {found} (docs/security.md, Coexistence)")
    yield found
    if found.mounted:
        subprocess.run(["umount", str(found.tracefs)], capture_output=True)


def file_offset(binary: Path, symbol: str) -> int:
    """Where `symbol`'s first byte is in the file (what a uprobe is placed at)."""
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        (sym,) = [s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name == symbol]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= sym["st_value"] < \
                    seg["p_vaddr"] + seg["p_filesz"]:
                return int(sym["st_value"] - seg["p_vaddr"] + seg["p_offset"])
    raise AssertionError(f"{symbol} is not in a loaded segment of {binary}")


def run_with_uprobe(probes: Uprobes, prog: Path, patch: Path, steps: str, mode: str) -> list[str]:
    """Run rel_gdb `steps`: at the first "w" a uprobe goes on rel_target's entry, at the
    second it is removed.  Its output lines, then "exit <status>"."""
    event = f"rel_target_{os.getpid()}"
    proc = subprocess.Popen([str(prog), steps, str(patch)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=program_env(mode))
    lines, waits, probed = [], 0, False
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("waiting"):
                waits += 1
                if waits == 1:
                    probes.add(event, prog, file_offset(prog, "rel_target"))
                    probed = True
                elif probed:
                    probes.remove(event)
                    probed = False
                proc.stdin.write("\n")
                proc.stdin.flush()
        lines.append(f"exit {proc.wait(timeout=30)}")
    finally:
        if probed:
            probes.remove(event)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines


@pytest.mark.parametrize("mode", MODES)
def test_apply_refuses_an_entry_holding_a_uprobe(uprobes: Uprobes, gdb_build: tuple[Path, Path],
                                                 mode: str) -> None:
    prog, patch = gdb_build
    lines = run_with_uprobe(uprobes, prog, patch, "wacwac", mode)
    assert lines[0] == "waiting"
    assert lines[1].startswith("apply failed: ") and "bytes at its entry differ" in lines[1], lines
    assert lines[2] == "result 4" and lines[3] == "waiting"
    # The probe is gone.  The kernel restored the *file's* first byte: in dispatch mode that
    # is the site as built; in jump mode it is the 67 the shim's NOP starts with too.  So
    # the site holds the shim's bytes again and the patch applies, in both modes.
    assert lines[4:] == ["apply ok", "result 202", "done", "exit 0"], lines
    figures(f"uprobe on an unpatched entry ({mode})", after_removal=lines[4].split(":")[0])


@pytest.mark.parametrize("mode", MODES)
def test_a_uprobe_on_a_patched_entry_keeps_the_program_correct(
        uprobes: Uprobes, gdb_build: tuple[Path, Path], mode: str) -> None:
    prog, patch = gdb_build
    lines = run_with_uprobe(uprobes, prog, patch, "acwcwc", mode)
    assert lines == ["apply ok", "result 202", "waiting", "result 202", "waiting", "result 202",
                     "done", "exit 0"], lines
