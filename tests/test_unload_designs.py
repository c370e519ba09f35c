"""Unload's check against program designs it must neither miss nor disturb (issue 11 §2).

tests/programs/unload_designs.c: a thread parked inside the patch's replacement while the
process has more than 5,000 mappings, or while a handler of the program runs on an
alternate signal stack on top of it (waiting, or spinning); and threads blocked in
sleep/poll/epoll_wait/select/nanosleep that must return their normal results across
1,000 unloads.  "busy, retry" while a thread may run the patch, unloaded once none can,
never a crash; both modes.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.builds import PROGRAMS, build_patch, build_program
from support.cli import cli
from support.servers import MODES


@pytest.fixture(scope="module")
def designs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("designs")
    prog = build_program([PROGRAMS / "unload_designs.c"], d / "unload_designs")
    patch = build_patch(prog, PROGRAMS / "unload_designs_patch.c", d / "unload_designs_patch.so")
    return prog, patch


class Session:
    """The program driven over its stdin: one command, one answer line."""

    def __init__(self, prog: Path, patch: Path, design: list[str], mode: str, tmp: Path) -> None:
        self.release = tmp / "release"
        self.stderr = tmp / "stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
        env.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0",
                    "PARK_RELEASE": str(self.release)})
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([str(prog), design[0], str(patch), *design[1:]],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env)
        self.wait_for("ready")

    def line(self) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout.readline()
        assert out, f"the program died: status {self.proc.wait()}"
        return out.rstrip("\n")

    def ask(self, command: str) -> str:
        """The answer to `command`, skipping the parker's own lines."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        while (answer := self.line()).startswith("park returned") or answer == "inside":
            pass
        return answer

    def wait_for(self, wanted: str) -> None:
        while (line := self.line()) != wanted:
            assert line.startswith("park returned") or line == "inside", line

    def unload_eventually(self) -> int:
        """unload until it is done (a stale return address may linger); the busy answers."""
        deadline, busy = time.monotonic() + 30, 0
        while (answer := self.ask("unload")) != "unload ok":
            assert answer.startswith("unload busy: "), answer
            assert time.monotonic() < deadline, answer
            busy += 1
            time.sleep(0.1)
        return busy

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    started: list[Session] = []
    yield started
    for s in started:
        s.close()


def park_inside_then_check(s: Session, before_unload: list[str]) -> str:
    """Apply, let the parker enter the replacement, revert, run `before_unload`, unload:
    that answer (must be busy).  Then release it and unload for real."""
    assert s.ask("apply") == "apply ok"
    s.wait_for("inside")
    assert s.ask("revert") == "revert ok"
    for command in before_unload:
        assert s.ask(command) == "handler entered"
    answer = s.ask("unload")
    s.release.touch()
    s.wait_for("park returned 101")  # it left the replacement alive
    s.unload_eventually()
    s.wait_for("park returned 1")    # and runs the original now
    return answer


@pytest.mark.parametrize("mode", MODES)
def test_a_thread_inside_the_patch_is_seen_beyond_5000_mappings(
        designs: tuple[Path, Path], tmp_path: Path, sessions: list[Session], mode: str) -> None:
    s = Session(*designs, ["maps", "6000"], mode, tmp_path)
    sessions.append(s)
    nmaps = len(Path(f"/proc/{s.proc.pid}/maps").read_text().splitlines())
    assert nmaps > 6000
    answer = park_inside_then_check(s, [])
    assert answer.startswith("unload busy: thread "), answer
    assert "may be running unload_designs_patch's code" in answer, answer
    assert s.proc.poll() is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("handler", ["wait", "spin"])
def test_a_handler_on_an_alternate_stack_does_not_hide_the_patch_frames_it_interrupted(
        designs: tuple[Path, Path], tmp_path: Path, sessions: list[Session], mode: str,
        handler: str) -> None:
    """The parker, inside the replacement, runs a SIGUSR1 handler on its sigaltstack that
    waits in nanosleep (checked from outside: blocked) or spins (checked by the signal)."""
    s = Session(*designs, [f"altstack-{handler}"], mode, tmp_path)
    sessions.append(s)
    answer = park_inside_then_check(s, ["signal"])
    assert answer.startswith("unload busy: thread "), answer
    assert s.proc.poll() is None


@pytest.mark.parametrize("mode", MODES)
def test_blocked_system_calls_return_their_normal_results_across_1000_unloads(
        designs: tuple[Path, Path], mode: str) -> None:
    prog, patch = designs
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0"})
    out = subprocess.run([str(prog), "blockers", str(patch), "1000"], capture_output=True,
                         text=True, env=env, timeout=600)
    print(mode, out.stdout.strip())
    assert out.returncode == 0, out.stdout + out.stderr
    f = {k: int(v) for k, v in (kv.split("=") for kv in out.stdout.split())}
    assert (f["unloads"], f["failed"], f["hot_wrong"]) == (1000, 0, 0), f
    assert f["hot_calls"] > 0
    for call in ("sleep", "poll", "epoll_wait", "select", "nanosleep"):
        assert f[f"{call}_calls"] > 0 and f[f"{call}_wrong"] == 0, (call, out.stderr)
    assert out.stderr == ""


# ---- sanitizer builds: the program and the shim compiled with -fsanitize ------------------


def sanitized(factory: pytest.TempPathFactory, kind: str) -> tuple[Path, Path]:
    """unload_designs and its patch with -fsanitize=KIND on every compile line (a build
    that sets CFLAGS for everything); a skip naming what is missing if gcc cannot."""
    d = factory.mktemp(f"designs_{kind}")
    flag = f"-fsanitize={kind}"
    try:
        prog = build_program([PROGRAMS / "unload_designs.c"], d / "unload_designs",
                             cflags=[flag], shim_cflags=[flag])
    except AssertionError as e:
        pytest.skip(f"gcc cannot build with {flag} here: {str(e).splitlines()[-1]}")
    patch = build_patch(prog, PROGRAMS / "unload_designs_patch.c", d / "unload_designs_patch.so")
    return prog, patch


@pytest.fixture(scope="module")
def asan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return sanitized(tmp_path_factory, "address")


@pytest.fixture(scope="module")
def tsan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return sanitized(tmp_path_factory, "thread")


@pytest.mark.parametrize("mode", MODES)
def test_an_addresssanitizer_build_unloads_like_any_other(
        asan: tuple[Path, Path], tmp_path: Path, sessions: list[Session], mode: str) -> None:
    """The check reads below stack pointers and other threads' stacks: not instrumented."""
    s = Session(*asan, ["maps", "10"], mode, tmp_path)
    sessions.append(s)
    answer = park_inside_then_check(s, [])
    assert answer.startswith("unload busy: thread "), answer
    assert s.quit() == 0
    assert "AddressSanitizer" not in s.stderr.read_text(), s.stderr.read_text()
    prog, patch = asan
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0"})
    out = subprocess.run([str(prog), "blockers", str(patch), "100"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stderr == "", out.stdout + out.stderr
    f = {k: int(v) for k, v in (kv.split("=") for kv in out.stdout.split())}
    assert (f["unloads"], f["failed"], f["hot_wrong"]) == (100, 0, 0), f


@pytest.mark.parametrize("mode", MODES)
def test_under_threadsanitizer_blocked_threads_are_checked_and_running_ones_mean_busy(
        tsan: tuple[Path, Path], tmp_path: Path, sessions: list[Session], mode: str) -> None:
    """ThreadSanitizer delays signals and hands handlers a stale context: no thread is
    signalled; a blocked one is checked from outside, a running one makes it busy."""
    (tmp_path / "blocked").mkdir()
    s = Session(*tsan, ["maps", "10"], mode, tmp_path / "blocked")
    sessions.append(s)
    answer = park_inside_then_check(s, [])  # ends with a successful unload
    assert answer.startswith("unload busy: thread "), answer
    assert "(blocked in system call" in answer, answer

    (tmp_path / "release").touch()  # the replacement returns at once: the thread never waits
    hot = Session(*tsan, ["hot"], mode, tmp_path)
    sessions.append(hot)
    assert hot.ask("apply") == "apply ok"
    assert hot.ask("revert") == "revert ok"
    answer = hot.ask("unload")
    assert answer.startswith("unload busy: thread ") and "ThreadSanitizer" in answer, answer
    assert hot.proc.poll() is None


# ---- a thread stopped on a jump-mode trampoline into the patch --------------------------


class Gdb:
    """gdb attached in non-stop mode (only the thread that hits a breakpoint stops), driven
    over a pipe; each command's output is what gdb printed within `wait` seconds."""

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            ["gdb", "-nx", "-q", "-iex", "set debuginfod enabled off", "-iex", "set non-stop on",
             "-iex", "set pagination off", "-iex", "set confirm off", "-p", str(pid)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, command: str, until: str, wait: float = 60) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        out, end = "", time.monotonic() + wait
        while until not in out:
            left = end - time.monotonic()
            assert left > 0, f"gdb did not say {until!r} after {command!r}: {out}"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode(errors="replace")
                assert chunk, f"gdb exited: {out}"
                out += chunk
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.needs_gdb
def test_a_thread_stopped_on_a_trampoline_into_the_patch_counts_as_inside_it(
        designs: tuple[Path, Path], tmp_path: Path, sessions: list[Session]) -> None:
    """Jump mode: a patched site jumps to a trampoline, which jumps into the patch.  A
    thread stopped on the trampoline (here by a debugger's breakpoint) runs the patch
    next: unload must say busy until it has gone on."""
    (tmp_path / "release").touch()  # the replacement returns at once
    s = Session(*designs, ["hot"], "jump", tmp_path)
    sessions.append(s)
    assert s.ask("apply") == "apply ok"
    gdb = Gdb(s.proc.pid)
    try:
        gdb.run("echo attached\\n", "attached")
        site = gdb.run("x/2i park", "<park+")
        found = re.search(r"<park(?:\+\d+)?>:\s+(?:addr32 )?jmp\s+(0x[0-9a-f]+)", site)
        assert found, site
        trampoline = int(found.group(1), 16)
        gdb.run(f"break *{trampoline:#x}", "Breakpoint 1 at")
        gdb.run("continue -a &", "hit Breakpoint 1")  # the hot thread stops on it
        assert s.ask("revert") == "revert ok"
        answer = s.ask("unload")
        assert answer.startswith("unload busy: thread ") and "(stopped)" in answer, answer
        gdb.run("delete", "(gdb)")
        gdb.run("echo deleted\\n", "deleted")
        gdb.run("continue -a &", "Continuing")
        gdb.run("detach", "detached")
    finally:
        gdb.close()
    s.unload_eventually()
    assert s.ask("apply") == "apply ok"  # alive, and patches as before


@pytest.mark.stress
@pytest.mark.parametrize("mode", MODES)
def test_the_window_left_poll_loops_awake_every_millisecond(
        designs: tuple[Path, Path], mode: str) -> None:
    """The figure docs/security.md states: threads that are seen running on every look are
    signalled, and one that blocks in the instant between the last look and the signal,
    or that waits that long for a CPU after waking, sees EINTR.  poll() with a 1 ms
    timeout is the worst case; 20 ms is an ordinary event loop.  The patch's callers
    always get a right answer and the process lives."""
    prog, patch = designs
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_RUNTIME_DIR": str(Path(patch).parent / "run")})
    proc = subprocess.Popen([str(prog), "window", str(patch), "1000"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        f = {k: int(v) for k, v in (kv.split("=") for kv in line.split())}
        status = cli("status", "--pid", str(proc.pid), "--json",
                     env_extra={"FENTRY_RUNTIME_DIR": env["FENTRY_RUNTIME_DIR"]})
        checks = json.loads(status.stdout)["costs"]["unload_checks"]
        print(f"{mode}: {line.strip()} checks={checks}")
        assert (f["unloads"], f["hot_wrong"]) == (1000, 0), f
        assert checks["runs"] >= 1000 and checks["threads_signalled"] >= 1000  # the hot thread
    finally:
        _, err = proc.communicate(input="", timeout=60)
    assert proc.returncode == 0 and err == "", err
