"""A program that sandboxes itself after start (seccomp) keeps running right (issue 11 §6).

Services often install a seccomp filter once initialised.  A filter that refuses one of
the two calls a live code rewrite makes - membarrier (syncing every core) or pwrite to
/proc/self/mem - must not make a rewrite fail half-way (a site left spinning would hang
every thread that reaches it) nor blame another cause.  Jump mode checks both calls
before writing anything (shim/arch/x86_64/poke.c): apply and revert are refused with one
line naming the call and the filter, the process keeps running what it ran (a patch in
effect stays in effect), and status says why code cannot be rewritten.  Dispatch mode
never writes code: it applies and reverts under the same filter.

tests/programs/sandboxed.c: two threads call the patched function all along and count
results that are neither the old nor the new function's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fentry_build.client import control

from support.builds import PROGRAMS, build_patch, build_program
from support.cli import cli
from support.lineprog import LineProgram

OLD, NEW = "calc 40", "calc 41"
CALLS = {"membarrier": "membarrier", "pwrite64": "pwrite to /proc/self/mem"}


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sandboxed")
    prog = build_program([PROGRAMS / "sandboxed.c"], d / "sandboxed")
    return prog, build_patch(prog, PROGRAMS / "sandboxed_patch.c", d / "sandboxed_patch.so")


@pytest.fixture
def started(sandboxed: tuple[Path, Path], tmp_path: Path) -> Iterator[list[LineProgram]]:
    programs: list[LineProgram] = []
    yield programs
    for p in programs:
        p.kill()


def start(sandboxed: tuple[Path, Path], started: list[LineProgram], tmp_path: Path,
          mode: str) -> LineProgram:
    p = LineProgram([str(sandboxed[0])], tmp_path, mode)
    started.append(p)
    assert p.line() == "ready"
    assert control.status(p.pid)["mode"] == mode
    return p


def show(p: LineProgram) -> str:
    p.send("show")
    return p.line()


def forbid(p: LineProgram, call: str) -> None:
    p.send(f"forbid {call}")
    assert p.line() == f"forbidden {call}"


def finish(p: LineProgram) -> None:
    counts = p.finish()
    assert counts["wrong"] == "0" and int(counts["calls"]) > 0


@pytest.mark.parametrize("call", sorted(CALLS))
def test_jump_mode_refuses_to_apply_under_a_filter_and_says_why(
        sandboxed: tuple[Path, Path], started: list[LineProgram], tmp_path: Path,
        call: str) -> None:
    p = start(sandboxed, started, tmp_path, "jump")
    assert control.status(p.pid)["rewrite_error"] is None
    forbid(p, call)
    out = cli("apply", "--pid", str(p.pid), str(sandboxed[1]))
    assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1
    assert f"{CALLS[call]} is refused by a seccomp filter of this process" in out.stderr
    assert "nothing changed" in out.stderr and "trampoline" not in out.stderr
    assert show(p) == OLD
    status = control.status(p.pid)
    assert status["mode"] == "jump" and status["patches_active"] == 0
    assert "seccomp filter" in status["rewrite_error"]
    shown = cli("status", "--pid", str(p.pid))
    assert shown.returncode == 0 and "seccomp filter" in shown.stdout
    # Asked again, the same refusal: nothing was left half-done by the first.
    again = cli("apply", "--pid", str(p.pid), str(sandboxed[1]))
    assert again.returncode == 1 and again.stderr == out.stderr
    assert show(p) == OLD
    finish(p)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_patch_in_effect_stays_in_effect_when_revert_is_refused(
        sandboxed: tuple[Path, Path], started: list[LineProgram], tmp_path: Path,
        call: str) -> None:
    p = start(sandboxed, started, tmp_path, "jump")
    applied = cli("apply", "--pid", str(p.pid), str(sandboxed[1]))
    assert applied.returncode == 0, applied.stderr
    assert show(p) == NEW
    forbid(p, call)
    out = cli("revert", "--pid", str(p.pid), "sandboxed_patch")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert f"{CALLS[call]} is refused by a seccomp filter" in out.stderr
    assert show(p) == NEW
    (entry,) = control.list_patches(p.pid)["patches"]
    assert entry["state"] == "active"
    finish(p)


def test_dispatch_mode_applies_and_reverts_under_the_same_filters(
        sandboxed: tuple[Path, Path], started: list[LineProgram], tmp_path: Path) -> None:
    p = start(sandboxed, started, tmp_path, "dispatch")
    forbid(p, "membarrier")
    forbid(p, "pwrite64")
    for _ in range(3):
        assert cli("apply", "--pid", str(p.pid), str(sandboxed[1])).returncode == 0
        assert show(p) == NEW
        assert cli("revert", "--pid", str(p.pid), "sandboxed_patch").returncode == 0
        assert show(p) == OLD
    assert control.status(p.pid)["rewrite_error"] is None
    finish(p)


def test_a_filter_refusing_the_address_space_reservation_leaves_the_patch_far_and_working(
        sandboxed: tuple[Path, Path], started: list[LineProgram], tmp_path: Path) -> None:
    # Jump mode steers a patch's load near the program with mmap(MAP_FIXED_NOREPLACE)
    # reservations (shim/arch/x86_64/near.c); refused, the patch loads where glibc puts it
    # and its site goes through a trampoline: applied all the same, and status says why.
    p = start(sandboxed, started, tmp_path, "jump")
    forbid(p, "mmap-noreplace")
    applied = cli("apply", "--pid", str(p.pid), str(sandboxed[1]))
    assert applied.returncode == 0, applied.stderr
    assert show(p) == NEW
    status = control.status(p.pid)
    assert "mmap() of address space to steer the load is refused" in status["far_reason"]
    assert status["costs"]["trampolines"] == 1 and status["costs"]["sites_direct"] == 0
    assert cli("revert", "--pid", str(p.pid), "sandboxed_patch").returncode == 0
    assert show(p) == OLD
    finish(p)
