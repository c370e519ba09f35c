"""Jump mode: sites are a `test` until patched, patched sites jump; both modes survive stress.

The forms (shim/arch/x86_64/sites.h) differ in one byte, the opcode; the byte after it is
the spin's rel8 (fd for 6-byte sites, fe for 5-byte ones) in all of them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.builds import PROGRAMS, build_patch, build_program, run

UNPATCHED5 = "a9 fe"     # test $imm32,%eax
UNPATCHED6 = "67 a9 fd"  # addr32 test $imm32,%eax
PATCHED5 = "e9 fe"       # jmp rel32 (to a trampoline at the residue that keeps fe)
PATCHED6 = "67 e9 fd"    # addr32 jmp rel32


def execute(prog: Path, *args: str, env: dict[str, str] | None = None,
            timeout: int = 120) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    full.update(env or {})
    return subprocess.run([str(prog), *args], capture_output=True, text=True, env=full,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sitebytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("jump")
    prog = build_program([PROGRAMS / "sitebytes.c"], d / "sitebytes")
    patch = build_patch(prog, PROGRAMS / "sitebytes_patch.c", d / "sitebytes_patch.so")
    return prog, patch


def parse(out: str) -> dict[str, tuple[str, int]]:
    rows = {}
    for line in out.splitlines():
        if " -> " in line:
            head, result = line.split(" -> ")
            when, *hexbytes = head.split()
            rows[when] = (" ".join(hexbytes), int(result))
    return rows


def test_jump_mode_turns_sites_into_tests_and_patches_into_jumps(
        sitebytes: tuple[Path, Path]) -> None:
    prog, patch = sitebytes
    out = execute(prog, str(patch))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[0] == "mode jump"
    rows = parse(out.stdout)
    # PIE with the shim linked: the site was `67 e8 <rel32>` (6 bytes): now the 6-byte test
    # that keeps the call's last three bytes.
    assert rows["start"][0].startswith(UNPATCHED6) and rows["start"][1] == 2
    # A 6-byte site keeps gcc's addr32 prefix (uprobes restore the file's first byte).
    assert rows["applied"][0].startswith(PATCHED6), "a patched 6-byte site is addr32 jmp rel32"
    assert rows["applied"][1] == 101, "the replacement ran and called the original"
    # Reverting flips the opcode back alone: the tail keeps the jump's (dead) bytes.
    assert rows["reverted"][0].startswith(UNPATCHED6) and rows["reverted"][1] == 2
    assert rows["reverted"][0][9:] == rows["applied"][0][9:]


def test_non_pie_five_byte_sites_become_five_byte_tests(tmp_path: Path) -> None:
    prog = build_program([PROGRAMS / "sitebytes.c"], tmp_path / "sitebytes",
                         cflags=["-fno-pie"], ldflags=["-no-pie"])
    patch = build_patch(prog, PROGRAMS / "sitebytes_patch.c", tmp_path / "sitebytes_patch.so")
    rows = parse(execute(prog, str(patch)).stdout)
    assert rows["start"][0].startswith(UNPATCHED5) and rows["start"][1] == 2
    # A 5-byte site has room only for jmp rel32 to the trampoline.
    assert rows["applied"][0].startswith(PATCHED5) and rows["applied"][1] == 101
    assert rows["reverted"][0].startswith(UNPATCHED5) and rows["reverted"][1] == 2


def test_cf_protection_keeps_endbr64_before_the_site(tmp_path: Path) -> None:
    prog = build_program([PROGRAMS / "sitebytes.c"], tmp_path / "sitebytes",
                         cflags=["-fcf-protection"])
    patch = build_patch(prog, PROGRAMS / "sitebytes_patch.c", tmp_path / "sitebytes_patch.so")
    rows = parse(execute(prog, str(patch)).stdout)
    assert rows["start"][0].startswith("f3 0f 1e fa " + UNPATCHED6)
    assert rows["applied"][0].startswith("f3 0f 1e fa " + PATCHED6) and rows["applied"][1] == 101


def test_dispatch_mode_never_writes_code(sitebytes: tuple[Path, Path]) -> None:
    prog, patch = sitebytes
    out = execute(prog, str(patch), env={"FENTRY_MODE": "dispatch"})
    assert out.stdout.splitlines()[0] == "mode dispatch"
    rows = parse(out.stdout)
    assert rows["start"][0].startswith("67 e8 ")
    assert rows["applied"][0] == rows["start"][0] and rows["applied"][1] == 101
    assert rows["reverted"][1] == 2


def test_falls_back_to_dispatch_when_code_cannot_be_written(
        sitebytes: tuple[Path, Path], tmp_path: Path) -> None:
    prog, patch = sitebytes
    lib = tmp_path / "failopen.so"
    run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(PROGRAMS / "failopen.c"), "-ldl"])
    out = execute(prog, str(patch), env={"LD_PRELOAD": str(lib)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "mode dispatch"
    assert parse(out.stdout)["applied"][1] == 101


@pytest.fixture(scope="module")
def stress(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("stress")
    prog = build_program([PROGRAMS / "stress.c"], d / "stress")
    patch = build_patch(prog, PROGRAMS / "stress_patch.c", d / "stress_patch.so")
    return prog, patch


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
@pytest.mark.stress
def test_stress_10000_apply_revert_cycles_under_8_calling_threads(
        stress: tuple[Path, Path], mode: str) -> None:
    prog, patch = stress
    out = execute(prog, str(patch), "10000", env={"FENTRY_MODE": mode}, timeout=300)
    print(out.stdout)  # the figures: cycles, calls, calls that saw the new code, wrong
    assert out.returncode == 0, out.stdout + out.stderr
    fields = dict(kv.split("=") for kv in out.stdout.split())
    assert fields["mode"] == mode
    assert fields["cycles"] == "10000"
    assert fields["wrong"] == "0"
    assert int(fields["calls"]) > 0 and int(fields["new"]) > 0


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
def test_a_forked_child_patches_itself_not_its_parent(tmp_path: Path, mode: str) -> None:
    prog = build_program([PROGRAMS / "forkpatch.c"], tmp_path / "forkpatch")
    # The patch replaces entry_probe; its registration is generated for this program.
    patch = build_patch(prog, PROGRAMS / "sitebytes_patch.c", tmp_path / "sitebytes_patch.so")
    out = execute(prog, str(patch), env={"FENTRY_MODE": mode, "FENTRY_CONTROL": "0"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        "child patched 101",
        "parent after child 2",
        "second child inherits 101",
        "parent patched 101",
    ]
