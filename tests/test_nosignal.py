"""Live rewrites never rely on a signal: programs that block or mask signals stay alive and right.

Jump mode rewrites a site by flipping one opcode byte through a spin (a jump to itself)
while threads run it (shim/arch/x86_64/poke.c); no thread is ever sent a signal.  Each
test builds a program of one design that a signal-based rewrite would crash (a thread
that meets an int3 with SIGTRAP blocked dies, and the process with it), keeps it busy,
and drives 1,000 apply/revert cycles from another process through the command line's
own code (`fentry_build.cli.main`, over the control socket), plus a few through the
`fentry-build` command itself.  Both modes; the process must stay alive, every result
must be the old or the new function's, and the cycles must all succeed.

The other two tests check what the spin gives a batch: the functions of one patch switch
together (no caller sees the new f and then the old g), and a function patched by A that
switches to B never runs its original in between.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fentry_build.client import control

from support.builds import PROGRAMS, build_patch, build_program
from support.cli import cli, package_env
from support.lineprog import LineProgram
from support.servers import MODES

CYCLES = 1000
CLI_CYCLES = 3  # through the `fentry-build` command itself (a new interpreter per call)

pytestmark = pytest.mark.stress


@pytest.fixture
def programs() -> Iterator[list[LineProgram]]:
    started: list[LineProgram] = []
    yield started
    for p in started:
        p.kill()


_DRIVER = """
import contextlib, io, sys
from fentry_build.cli import main
pid, cycles, ops = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for i in range(cycles):
    for op in ops:
        verb, arg = op.split("=", 1)
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main([verb, "--pid", pid, arg])
        if rc != 0:
            print(f"cycle {i}: {verb} {arg} exited {rc}")
            sys.exit(1)
print("ok")
"""


def drive(pid: int, cycles: int, ops: list[tuple[str, str]]) -> None:
    """`cycles` times each (verb, argument) of ops, through the CLI's code in one process;
    then CLI_CYCLES times through the `fentry-build` command."""
    argv = [sys.executable, "-c", _DRIVER, str(pid), str(cycles), *(f"{v}={a}" for v, a in ops)]
    out = subprocess.run(argv, capture_output=True, text=True, env=package_env(), timeout=1200)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
    for _ in range(CLI_CYCLES):
        for verb, arg in ops:
            done = cli(verb, "--pid", str(pid), arg)
            assert done.returncode == 0, done.stderr


# ---- the three designs of issue 11 §1, and the shim's own threads ------------------------------


@pytest.fixture(scope="module")
def nosig(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("nosig")
    prog = build_program([PROGRAMS / "nosig.c"], d / "nosig")
    return (prog, build_patch(prog, PROGRAMS / "nosig_patch.c", d / "nosig_patch.so"),
            build_patch(prog, PROGRAMS / "nosig_cb_patch.c", d / "nosig_cb_patch.so"))


def run_design(nosig: tuple[Path, Path, Path], programs: list[LineProgram], tmp_path: Path,
               design: str, mode: str) -> dict[str, str]:
    prog, patch, cb_patch = nosig
    inherited = design == "inherited"
    p = LineProgram([str(prog), design], tmp_path, mode, block_all=inherited,
                    env={"FENTRY_CALLBACK_TIMEOUT_MS": "200"})
    programs.append(p)
    premise = p.line()
    assert premise == ("trap-blocked 1" if design in ("blocked", "inherited") else "trap-blocked 0")
    assert p.line() == "ready"
    assert control.status(p.pid)["mode"] == mode
    if design == "callback":
        # Its post-patch callback never returns: abandoned after 200 ms, it keeps calling
        # nosig_calc() from the shim's thread, which blocks every signal.
        control.apply(p.pid, cb_patch)
    if design == "blocked":
        os.kill(p.pid, signal.SIGUSR1)  # taken by the program's sigwait() thread
    drive(p.pid, CYCLES, [("apply", str(patch)), ("revert", "nosig_patch")])
    if design == "blocked":
        os.kill(p.pid, signal.SIGUSR2)
    counts = p.finish()
    print(f"\n[figures] {design} ({mode}): " + " ".join(f"{k}={v}" for k, v in counts.items()))
    assert counts["wrong"] == "0" and counts["cb_wrong"] == "0"
    assert int(counts["calls"]) > 0 and int(counts["new"]) > 0
    return counts


@pytest.mark.parametrize("mode", MODES)
def test_workers_that_block_every_signal_beside_a_sigwait_thread(
        nosig: tuple[Path, Path, Path], programs: list[LineProgram], tmp_path: Path,
        mode: str) -> None:
    counts = run_design(nosig, programs, tmp_path, "blocked", mode)
    assert int(counts["handled"]) >= 1  # the sigwait() thread still takes the signals


@pytest.mark.parametrize("mode", MODES)
def test_a_handler_with_every_signal_masked_calls_the_patched_function(
        nosig: tuple[Path, Path, Path], programs: list[LineProgram], tmp_path: Path,
        mode: str) -> None:
    counts = run_design(nosig, programs, tmp_path, "handler", mode)
    assert int(counts["handled"]) > 0  # the handler ran (and called nosig_calc) meanwhile


@pytest.mark.parametrize("mode", MODES)
def test_a_program_started_with_every_signal_blocked(
        nosig: tuple[Path, Path, Path], programs: list[LineProgram], tmp_path: Path,
        mode: str) -> None:
    run_design(nosig, programs, tmp_path, "inherited", mode)


@pytest.mark.parametrize("mode", MODES)
def test_an_abandoned_callback_thread_calls_the_patched_function(
        nosig: tuple[Path, Path, Path], programs: list[LineProgram], tmp_path: Path,
        mode: str) -> None:
    counts = run_design(nosig, programs, tmp_path, "callback", mode)
    assert int(counts["cb_calls"]) > 0


# ---- what the spin gives a batch ---------------------------------------------------------------


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    d = tmp_path_factory.mktemp("switch")
    prog = build_program([PROGRAMS / "switch.c"], d / "switch")
    names = ["switch_pair_patch", "switch_h1_patch", "switch_h2_patch", "switch_h3_patch",
             "switch_h4_patch"]
    return prog, {n: build_patch(prog, PROGRAMS / f"{n}.c", d / f"{n}.so") for n in names}


@pytest.mark.parametrize("mode", MODES)
def test_the_functions_of_one_patch_switch_together(
        switch: tuple[Path, dict[str, Path]], programs: list[LineProgram], tmp_path: Path,
        mode: str) -> None:
    prog, patches = switch
    p = LineProgram([str(prog), "pair"], tmp_path, mode)
    programs.append(p)
    assert p.line() == "ready"
    drive(p.pid, CYCLES, [("apply", str(patches["switch_pair_patch"])),
                          ("revert", "switch_pair_patch")])
    counts = p.finish()
    print(f"\n[figures] pair ({mode}): " + " ".join(f"{k}={v}" for k, v in counts.items()))
    assert counts["wrong"] == "0"
    assert int(counts["inside"]) > 0  # call pairs did run inside switches


@pytest.mark.parametrize("mode", MODES)
def test_a_function_switching_between_patches_never_runs_its_original(
        switch: tuple[Path, dict[str, Path]], programs: list[LineProgram], tmp_path: Path,
        mode: str) -> None:
    prog, patches = switch
    p = LineProgram([str(prog), "gap"], tmp_path, mode)
    programs.append(p)
    assert p.line() == "ready"
    control.apply(p.pid, patches["switch_h1_patch"])
    p.send("arm")
    assert p.line() == "armed"
    # Stacking: h2 over h1 and back (1 -> 2 -> 1 ...).
    drive(p.pid, CYCLES // 2, [("apply", str(patches["switch_h2_patch"])),
                               ("revert", "switch_h2_patch")])
    # Cumulative patches replacing each other in one publish (1 -> 3 -> 4 -> 3 ...).
    drive(p.pid, CYCLES // 2, [("apply", str(patches["switch_h3_patch"])),
                               ("apply", str(patches["switch_h4_patch"]))])
    counts = p.finish()
    print(f"\n[figures] gap ({mode}): " + " ".join(f"{k}={v}" for k, v in counts.items()))
    assert counts["wrong"] == "0"
    assert all(int(n) > 0 for n in counts["seen"].split(",")[1:]), counts["seen"]
