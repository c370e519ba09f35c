"""Jump mode loads a patch within 2 GiB of the program, and a patched site jumps straight to
its replacement (issue 16, the patched call).

The shim steers dlopen() below the program by holding the address space above it for the
length of the load (shim/arch/x86_64/near.c); the generator's placement header starts each
replacement at the address residue its site's `jmp rel32` can reach (fentry.h, FENTRY_PLACE).
These tests build real programs and patches, read the bytes of the patched site in the
running process, and check what happens where the load cannot be steered: a limit on the
address space, a program that is not PIE, other threads changing the address space
meanwhile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from fentry_build import paths
from fentry_build.client import control

from support.builds import PROGRAMS, build_patch, build_program, run
from support.lineprog import LineProgram

TIMEOUT = 60.0
REACH = 2**31


class Proc(LineProgram):
    """`near serve` in jump mode: lines in, lines out."""

    def __init__(self, binary: Path, rundir: Path, address_space: int | None = None) -> None:
        super().__init__([str(binary), "serve"], rundir, "jump", address_space=address_space)
        assert self.line() == "ready"

    def ask(self, text: str) -> str:
        self.send(text)
        return self.line()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def start(procs: list[Proc], binary: Path, rundir: Path, address_space: int | None = None) -> Proc:
    p = Proc(binary, rundir, address_space)
    procs.append(p)
    return p


def mappings(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of each mapping of the process."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        assert m is not None, line
        found.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4)))
    return found


def symbol(path: Path, name: str) -> int:
    with open(path, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert symtab is not None
        (sym,) = symtab.get_symbol_by_name(name)
        return int(sym["st_value"])


def site_target(pid: int, binary: Path, function: str) -> tuple[bytes, int]:
    """The bytes of the function's site in the running process and where its jump lands."""
    exe = os.readlink(f"/proc/{pid}/exe")
    base = min(start for start, _, _, path in mappings(pid) if path == exe)
    addr = base + symbol(binary, function)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(addr)
        site = mem.read(6)
    assert site[:2] == b"\x67\xe9", site.hex()  # a patched 6-byte site: addr32 jmp rel32
    return site, addr + 6 + int.from_bytes(site[2:6], "little", signed=True)


def patch_code(pid: int, name: str) -> tuple[int, int]:
    """The executable mapping of the loaded patch `name` (its sealed copy, a memfd)."""
    (found,) = [(s, e) for s, e, perms, path in mappings(pid)
                if "x" in perms and path.startswith(f"/memfd:fentry:{name}.so")]
    return found


def program_span(pid: int) -> tuple[int, int]:
    exe = os.readlink(f"/proc/{pid}/exe")
    spans = [(s, e) for s, e, _, path in mappings(pid) if path == exe]
    return min(s for s, _ in spans), max(e for _, e in spans)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("near")
    prog = build_program([PROGRAMS / "near.c"], d / "near")
    nopie = build_program([PROGRAMS / "near.c"], d / "near_nopie", cflags=["-fno-pie"],
                          ldflags=["-no-pie"])
    placed = build_patch(prog, PROGRAMS / "near_patch.c", d / "near_patch.so")
    (d / "nopie").mkdir()
    nopie_patch = build_patch(nopie, PROGRAMS / "near_patch.c", d / "nopie" / "near_patch.so")
    # Built as before the placement header: the generator without --place, no -include.
    (d / "unplaced").mkdir()
    unplaced, reg = d / "unplaced" / "near_patch.so", d / "unplaced" / "near_patch.reg.c"
    run([sys.executable, "-m", "fentry_build.gen", "--binary", str(prog), "--patch",
         str(PROGRAMS / "near_patch.c"), "-o", str(reg), "--", "gcc"])
    run(["gcc", "-O2", "-shared", "-fPIC", f"-I{paths.include_dir()}", "-o", str(unplaced),
         str(PROGRAMS / "near_patch.c"), str(reg)])
    return {"prog": prog, "nopie": nopie, "placed": placed, "nopie_patch": nopie_patch,
            "unplaced": unplaced}


def test_a_patch_loads_below_the_program_and_its_site_jumps_straight_to_it(
        built: dict[str, Path], procs: list[Proc], tmp_path: Path) -> None:
    p = start(procs, built["prog"], tmp_path)
    assert p.ask("c") == "42"
    control.apply(p.pid, built["placed"])
    assert p.ask("c") == "63"
    lo, hi = patch_code(p.pid, "near_patch")
    first, last = program_span(p.pid)
    assert hi <= first and last - lo < REACH  # just below the program, within a rel32
    # One jump, straight from the site into the replacement: no trampoline in between.
    site, dest = site_target(p.pid, built["prog"], "compute")
    assert lo <= dest < hi and site[2] == 0xFD  # the spin's operand byte is kept
    status = control.status(p.pid)
    (patch,) = control.list_patches(p.pid)["patches"]
    assert status["far_reason"] is None and patch["near"] is True
    assert status["costs"]["sites_direct"] == 1 and status["costs"]["trampolines"] == 0
    # Revert, stack a second version over the first, unload: all as before.
    control.revert(p.pid, "near_patch")
    assert p.ask("c") == "42" and control.status(p.pid)["costs"]["sites_direct"] == 0
    control.apply(p.pid, built["placed"])
    assert p.ask("c") == "63"
    control.revert(p.pid, "near_patch")
    control.unload(p.pid, "near_patch")
    assert p.ask("c") == "42" and control.list_patches(p.pid)["patches"] == []


def test_an_unplaced_patch_loads_near_and_goes_through_a_direct_trampoline(
        built: dict[str, Path], procs: list[Proc], tmp_path: Path) -> None:
    p = start(procs, built["prog"], tmp_path)
    control.apply(p.pid, built["unplaced"])
    assert p.ask("c") == "63"
    lo, hi = patch_code(p.pid, "near_patch")
    _, tramp = site_target(p.pid, built["prog"], "compute")
    assert not lo <= tramp < hi
    with open(f"/proc/{p.pid}/mem", "rb") as mem:
        mem.seek(tramp)
        code = mem.read(5)
    assert code[0] == 0xE9  # the trampoline is a direct jmp rel32, not `jmp *0(%rip)`
    assert lo <= tramp + 5 + int.from_bytes(code[1:5], "little", signed=True) < hi
    costs = control.status(p.pid)["costs"]
    assert costs["sites_direct"] == 0 and costs["trampolines"] == 1


def test_with_an_address_space_limit_the_load_is_not_steered_and_status_says_why(
        built: dict[str, Path], procs: list[Proc], tmp_path: Path) -> None:
    p = start(procs, built["prog"], tmp_path, address_space=64 << 30)  # a limit, if a high one
    control.apply(p.pid, built["placed"])
    assert p.ask("c") == "63"
    status = control.status(p.pid)
    (patch,) = control.list_patches(p.pid)["patches"]
    assert patch["near"] is False
    assert status["far_reason"].startswith("near_patch: RLIMIT_AS is set")
    assert status["costs"]["sites_direct"] == 0 and status["costs"]["trampolines"] == 1
    lo, _ = patch_code(p.pid, "near_patch")
    assert lo - program_span(p.pid)[1] > REACH  # where glibc puts libraries: far above
    shown = subprocess.run([sys.executable, "-m", "fentry_build", "status", "--pid", str(p.pid)],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert "RLIMIT_AS is set" in shown.stdout, shown.stdout + shown.stderr


def test_a_program_that_is_not_pie_is_not_steered_and_status_says_why(
        built: dict[str, Path], procs: list[Proc], tmp_path: Path) -> None:
    p = start(procs, built["nopie"], tmp_path)
    control.apply(p.pid, built["nopie_patch"])
    assert p.ask("c") == "63"
    status = control.status(p.pid)
    assert "lies low in the address space" in status["far_reason"]
    assert status["costs"]["trampolines"] == 1


def test_steered_loads_leave_every_other_thread_allocating_and_calling(
        built: dict[str, Path], tmp_path: Path) -> None:
    # Threads map and unmap 4 KiB..32 MiB, malloc through brk and mmap, start threads, and
    # call the patched function, all while 150 loads are steered near the program.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update(FENTRY_RUNTIME_DIR=str(tmp_path), FENTRY_MODE="jump")
    out = subprocess.run([str(built["prog"]), "churn", str(built["placed"]), "150"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    counts = dict(kv.split("=") for kv in out.stdout.split())
    assert counts["cycles"] == "150" and counts["wrong"] == "0" and counts["failed"] == "0"
    assert int(counts["patched_seen"]) > 0
