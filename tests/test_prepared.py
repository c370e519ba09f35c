"""Sites prepared at build time: the program's text is never written at start, so it stays shared.

A program linked through the linker wrapper (fentry_build.build.ldwrap, what the Meson
subproject's default `sites=prepared` does) has every fentry site in its unpatched form in
the file (fentry_build.build.prepare).  These tests build one of 3,000 functions that way,
the same with the sites readied at start (`runtime`) and without instrumentation (plain),
and check: the file's sites, the memory a process keeps private, and each mode.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from fentry_build.binary.elf import SiteForm, read_binary
from fentry_build.build import prepare
from fentry_build.client import control
from fentry_build.errors import FentryError

from support.builds import PROGRAMS, build_patch, build_program, run
from support.cli import cli

N = 3000
PATCHED = [1, 2, 3]
TIMEOUT = 30.0


def write_sources(d: Path, n: int = N) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, n, 100):
        f = d / f"funcs_{start // 100:02d}.c"
        f.write_text("".join(f"long f_{i}(long x);\nlong f_{i}(long x) {{ return x + {i}; }}\n"
                             for i in range(start, start + 100)))
        files.append(f)
    table = d / "table.c"
    table.write_text("".join(f"long f_{i}(long);\n" for i in range(n)) +
                     "long (*const fns[])(long) = {" + ",".join(f"f_{i}" for i in range(n)) +
                     f"}};\nconst long nfns = {n};\n")
    return [*files, table, PROGRAMS / "prepared_main.c"]


@dataclass(frozen=True)
class Builds:
    plain: Path
    runtime: Path
    prepared: Path
    patch: Path           # for the prepared program
    runtime_patch: Path   # for the runtime one


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    d = tmp_path_factory.mktemp("prepared")
    srcs = write_sources(d / "src")
    plain = d / "plain"
    objs = []
    for s in srcs:
        obj = d / f"plain.{s.stem}.o"
        run(["gcc", "-O2", "-g", "-c", str(s), "-o", str(obj)])
        objs.append(str(obj))
    run(["gcc", "-o", str(plain), *objs])
    runtime = build_program(srcs, d / "runtime", sites="runtime")
    prepared = build_program(srcs, d / "prepared", sites="prepared")
    patch_c = d / "plus1000.c"
    patch_c.write_text("#include <fentry.h>\n" + "".join(
        f"static long f_{i}_new(long x) {{ return x + {i} + 1000; }}\nFENTRY_REPLACE(f_{i}, f_{i}_new);\n"
        for i in PATCHED))
    patch = build_patch(prepared, patch_c, d / "plus1000.so")
    (d / "rt").mkdir()
    runtime_patch = build_patch(runtime, patch_c, d / "rt" / "plus1000.so")
    return Builds(plain, runtime, prepared, patch, runtime_patch)


class Proc:
    """A running prepared_main program: lines in, lines out."""

    def __init__(self, binary: Path, rundir: Path, env: dict[str, str] | None = None) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
        full.update({"FENTRY_RUNTIME_DIR": str(rundir), **(env or {})})
        self.stderr = rundir / f"stderr.{time.monotonic_ns()}"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, bufsize=0, env=full,
                                         cwd=rundir)
        self.pid = self.proc.pid
        assert self.line() == "ready"

    def line(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                out = self.proc.stdout.readline()
                assert out, f"exited with status {self.proc.wait()}"
                return out.decode().strip()
        raise AssertionError("no answer")

    def ask(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        return self.line()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def start(procs: list[Proc], binary: Path, rundir: Path, **env: str) -> Proc:
    p = Proc(binary, rundir, env)
    procs.append(p)
    return p


# ---- the file ------------------------------------------------------------------------------


def test_the_build_writes_every_site_in_its_unpatched_form(builds: Builds, tmp_path: Path) -> None:
    info = read_binary(builds.prepared)
    forms = {f.name: f.site.form for f in info.functions if f.name.startswith("f_") and f.site}
    assert len(forms) == N and set(forms.values()) == {SiteForm.PREPARED_6}
    assert {f.site.form for f in read_binary(builds.runtime).functions
            if f.name.startswith("f_") and f.site} == {SiteForm.ADDR32_CALL}
    # The list for what needs the calls back, in a section that is not loaded.
    with open(builds.prepared, "rb") as stream:
        sec = ELFFile(stream).get_section_by_name(prepare.SECTION)
        assert sec is not None and not sec["sh_flags"] & 0x2  # not SHF_ALLOC
        data = sec.data()
    assert data[:8] == prepare.MAGIC
    count = int.from_bytes(data[12:16], "little")
    assert count == len([f for f in info.functions if f.site]) and count >= N
    # Preparing again changes nothing; a shared library is left as linked.
    copy = tmp_path / "again"
    shutil.copy2(builds.prepared, copy)
    result = prepare.prepare(copy)
    assert result.prepared == 0 and copy.read_bytes() == builds.prepared.read_bytes()
    lib = tmp_path / "libx.so"
    run(["gcc", "-shared", "-fPIC", "-pg", "-mfentry", "-o", str(lib),
         str(PROGRAMS / "lib_plugin.c")])
    before = lib.read_bytes()
    assert prepare.prepare(lib).skipped and lib.read_bytes() == before


def test_preparing_a_program_without_the_shim_changes_nothing(tmp_path: Path) -> None:
    prog = tmp_path / "noshim"
    run(["gcc", "-O2", "-pg", "-mfentry", "-o", str(prog), str(PROGRAMS / "compute.c")])
    before = prog.read_bytes()
    assert "no __fentry__ of its own" in prepare.prepare(prog).skipped
    assert prog.read_bytes() == before
    with pytest.raises(FentryError, match="is not a readable ELF file"):
        bad = tmp_path / "bad"
        bad.write_bytes(b"\x7fELF" + b"\0" * 60)
        prepare.prepare(bad)


# ---- memory --------------------------------------------------------------------------------


def smaps(pid: int) -> tuple[int, int]:
    """(Anonymous kB in the program's executable mappings, Anonymous kB in all).

    A text page the process wrote is a private copy: an anonymous page inside a file mapping.
    Private_Dirty is not that measure: it also counts the page cache of a file written moments
    ago (the build's own output, not yet written back) while one process maps it.
    """
    exe = os.readlink(f"/proc/{pid}/exe")
    text = 0
    mapping = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            mapping = line
        elif line.startswith("Anonymous:"):
            perms, path = mapping.split()[1], mapping.split()[-1]
            if "x" in perms and path == exe:
                text += int(line.split()[1])
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    m = re.search(r"^Anonymous:\s+(\d+) kB", rollup, re.M)
    assert m is not None
    return text, int(m.group(1))


def test_a_prepared_process_keeps_its_text_shared(builds: Builds, procs: list[Proc],
                                                   tmp_path: Path) -> None:
    plain = start(procs, builds.plain, tmp_path)
    runtime = start(procs, builds.runtime, tmp_path, FENTRY_CONTROL="0")
    prepared = start(procs, builds.prepared, tmp_path, FENTRY_CONTROL="0")
    figures = {name: smaps(p.pid) for name, p in (("plain", plain), ("runtime", runtime),
                                                   ("prepared", prepared))}
    print(f"\n[figures] anonymous kB (text, all): {figures}")
    # Readying the sites at start copies every text page; a prepared program writes none.
    assert figures["runtime"][0] > 0
    assert figures["prepared"][0] == 0 and figures["plain"][0] == 0
    # What the process keeps private beyond the plain build's is the shim's own (its
    # control thread, buffers), not the program's text.
    assert figures["prepared"][1] < figures["runtime"][1]
    assert prepared.ask("a") == f"original={N} patched=0"


# ---- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
def test_a_prepared_program_is_patched_in_both_modes(builds: Builds, procs: list[Proc],
                                                      tmp_path: Path, mode: str) -> None:
    p = start(procs, builds.prepared, tmp_path, FENTRY_MODE=mode)
    status = control.status(p.pid)
    assert status["mode"] == mode
    # Jump mode runs the sites as the build left them; dispatch mode put the calls back.
    assert status["sites"] == ("prepared" if mode == "jump" else "calls")
    if mode == "dispatch":  # the reason every program gives
        assert status["mode_reason"] == "FENTRY_MODE=dispatch"
    assert p.ask("c 1") == "8"
    done = cli("apply", "--pid", str(p.pid), str(builds.patch))
    assert done.returncode == 0, done.stderr
    assert p.ask("c 1") == "1008" and p.ask("c 4") == "11"
    assert p.ask("a") == f"original={N - len(PATCHED)} patched={len(PATCHED)}"
    done = cli("revert", "--pid", str(p.pid), "plus1000")
    assert done.returncode == 0, done.stderr
    assert p.ask("a") == f"original={N} patched=0"
    if mode == "jump":  # the patched sites' pages became private, the others did not
        assert smaps(p.pid)[0] > 0


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
def test_costs_unload_history_and_the_patch_directory_work_on_a_prepared_program(
        builds: Builds, procs: list[Proc], tmp_path: Path, mode: str) -> None:
    p = start(procs, builds.prepared, tmp_path, FENTRY_MODE=mode)
    pid = str(p.pid)
    status = control.status(p.pid)
    # Start-up: jump mode wrote no site; dispatch mode put every call back.
    written = status["costs"]["startup"]["sites_written"]
    assert written == 0 if mode == "jump" else written >= N
    assert cli("apply", "--pid", pid, str(builds.patch)).returncode == 0
    assert p.ask("c 1") == "1008"
    assert cli("revert", "--pid", pid, "plus1000").returncode == 0
    done = cli("unload", "--pid", pid, "plus1000")  # the stack check, then unmapped
    assert done.returncode == 0, done.stderr
    assert control.list_patches(p.pid)["patches"] == []
    assert control.status(p.pid)["costs"]["last_unload"]["ok"] is True
    assert p.ask("a") == f"original={N} patched=0"
    # The audit trail has each of them.
    trail = [(e["op"], e["name"], e["ok"]) for e in control.history(p.pid)["history"]]
    assert trail == [("load", "plus1000", True), ("revert", "plus1000", True),
                     ("unload", "plus1000", True)]
    # A process started later loads the patch directory before main.
    folder = tmp_path / "patchdir" / status["build_id"]
    folder.mkdir(parents=True)
    for d in (folder.parent, folder):
        d.chmod(0o755)
    shutil.copyfile(builds.patch, folder / "plus1000.so")
    (folder / "plus1000.so").chmod(0o644)
    later = start(procs, builds.prepared, tmp_path, FENTRY_MODE=mode,
                  FENTRY_PATCH_DIR=str(folder.parent))
    assert later.ask("a") == f"original={N - len(PATCHED)} patched={len(PATCHED)}"
    assert control.status(later.pid)["sites"] == ("prepared" if mode == "jump" else "calls")


def test_the_runtime_form_still_works_and_says_so(builds: Builds, procs: list[Proc],
                                                  tmp_path: Path) -> None:
    p = start(procs, builds.runtime, tmp_path)
    assert control.status(p.pid)["sites"] == "runtime"
    assert cli("apply", "--pid", str(p.pid), str(builds.runtime_patch)).returncode == 0
    assert p.ask("c 2") == "1009"


def test_where_code_cannot_be_written_a_prepared_programs_functions_are_refused(
        builds: Builds, procs: list[Proc], tmp_path: Path) -> None:
    failopen = tmp_path / "failopen.so"
    run(["gcc", "-shared", "-fPIC", "-o", str(failopen), str(PROGRAMS / "failopen.c"), "-ldl"])
    p = start(procs, builds.prepared, tmp_path, LD_PRELOAD=str(failopen))
    status = control.status(p.pid)
    assert status["mode"] == "dispatch" and status["sites"] == "prepared"
    assert "prepared at build time" in status["mode_reason"]
    done = cli("apply", "--pid", str(p.pid), str(builds.patch))
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "prepared at build time" in done.stderr
    assert p.ask("a") == f"original={N} patched=0"  # unchanged
    assert control.list_patches(p.pid)["patches"] == []


# ---- start-up in runtime form: the site list and a failed rewrite -------------------------------


def mcount_descents(binary: Path) -> int:
    """How often the program's recorded site list (__mcount_loc, PIE: each entry a RELATIVE
    relocation's addend) goes down: the shim sorts it at start."""
    with open(binary, "rb") as stream:
        elf = ELFFile(stream)
        loc = elf.get_section_by_name("__mcount_loc")
        rela = elf.get_section_by_name(".rela.dyn")
        assert loc is not None and rela is not None
        by_offset = {r["r_offset"]: r["r_addend"] for r in rela.iter_relocations()}
        sites = [by_offset[loc["sh_addr"] + 8 * i] for i in range(loc["sh_size"] // 8)]
    return sum(b < a for a, b in zip(sites, sites[1:]))


def test_a_start_up_rewrite_refused_half_way_puts_every_call_back(
        builds: Builds, procs: list[Proc], tmp_path: Path) -> None:
    # 600 functions 256-byte aligned: the sites span 150 KiB, more than one write at start
    # (64 KiB at most each); the second is refused, after the first went in.
    n = 600
    binary = build_program(write_sources(tmp_path / "src", n), tmp_path / "spread",
                           cflags=["-falign-functions=256"], sites="runtime")
    patch_c = tmp_path / "plus1000.c"
    shutil.copyfile(builds.runtime_patch.parent.parent / "plus1000.c", patch_c)
    patch = build_patch(binary, patch_c, tmp_path / "plus1000.so")
    lib = tmp_path / "failpwrite.so"
    run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(PROGRAMS / "failpwrite.c"), "-ldl"])
    p = start(procs, binary, tmp_path, LD_PRELOAD=str(lib), FAILPWRITE_AT="2")
    status = control.status(p.pid)
    assert "failpwrite: refused write 2" in p.stderr.read_text()
    assert status["mode"] == "dispatch" and status["sites"] == "calls"
    assert "could not be rewritten" in status["mode_reason"]
    assert p.ask("a") == f"original={n} patched=0"
    # f_1..f_3 were in the first write: their calls are back, so dispatch mode patches them.
    done = cli("apply", "--pid", str(p.pid), str(patch))
    assert done.returncode == 0, done.stderr
    assert p.ask("a") == f"original={n - len(PATCHED)} patched={len(PATCHED)}"


def test_a_site_list_far_out_of_order_is_sorted_at_start(tmp_path: Path, procs: list[Proc]) -> None:
    # Every other function cold: gcc moves those to .text.unlikely, which the linker puts
    # before .text, while the site list keeps the order of the sources (200 entries out of
    # order).
    n = 400
    srcs = write_sources(tmp_path / "src", n)
    for f in srcs:
        if f.name.startswith("funcs_"):
            f.write_text(re.sub(r"^long (f_\d*[13579])\(long x\) \{",
                                r"__attribute__((cold)) long \1(long x) {", f.read_text(),
                                flags=re.M))
    binary = build_program(srcs, tmp_path / "cold", sites="runtime")
    assert mcount_descents(binary) > 64  # more than the shim moves one by one: a full sort
    patch_c = tmp_path / "plus1000.c"
    patch_c.write_text("#include <fentry.h>\n" + "".join(
        f"static long f_{i}_new(long x) {{ return x + {i} + 1000; }}\nFENTRY_REPLACE(f_{i}, f_{i}_new);\n"
        for i in (1, 2, 201, 398)))
    patch = build_patch(binary, patch_c, tmp_path / "plus1000.so")
    p = start(procs, binary, tmp_path)
    status = control.status(p.pid)
    assert status["mode"] == "jump" and status["sites"] == "runtime"
    assert p.ask("a") == f"original={n} patched=0"
    done = cli("apply", "--pid", str(p.pid), str(patch))
    assert done.returncode == 0, done.stderr
    assert p.ask("a") == f"original={n - 4} patched=4"
    assert [p.ask(f"c {i}") for i in (1, 2, 3, 201, 398)] == ["1008", "1009", "10", "1208", "1405"]
