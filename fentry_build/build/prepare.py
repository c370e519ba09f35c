"""build/prepare.py - fentry sites prepared at build time (``python -m fentry_build.build.prepare``).

Jump mode turns every fentry site of a program into its unpatched form (a `test`, see
shim/arch/x86_64/sites.h) when the program starts: every text page is written, so it
becomes private to the process.  This post-link step writes that form into the file
instead, so a process that patches nothing writes no text page at all, and its program
text stays shared between processes:

    67 e8 r0 r1 r2 r3   ->   67 a9 fd r1 r2 r3       (PIE: addr32 call __fentry__)
    e8 r0 r1 r2 r3      ->   a9 fe r1 r2 r3          (non-PIE: call __fentry__)

Only a program's own calls of its own ``__fentry__`` (the shim linked in) are changed, and
only in an executable (a shared library keeps its calls: the dispatch table serves them).
The shim's probe site ``fentry_probe_site`` (shim/arch/x86_64/entry.S) is changed like every
other site: the shim reads it at start to know that the sites were prepared.  The site
list goes into a non-loaded section, ``.fentry_sites``, for what still needs the calls
(dispatch mode puts them back from it).  Running the step again on a prepared program
changes nothing.

Used by the Meson subproject (a wrapper of the linker, shim/build/ld.in) and the SCons tool.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from fentry_build.binary.elf import (
    ELF_ERRORS,
    DynamicRelocations,
    EntrySiteDecoder,
    FentryTarget,
    FunctionSymbolReader,
    MemoryImage,
    SPIN_REL8,
    SiteForm,
    unreadable,
)
from fentry_build.errors import FentryError

PROBE_SYMBOL = "fentry_probe_site"
SECTION = ".fentry_sites"
MAGIC = b"FENTSITE"
VERSION = 1
LEN6_BIT = 0x80000000  # in a list entry: the site is 6 bytes long (as the shim's sites.c)
OFFSET_MASK = 0x7FFFFFFF

# The call forms this step prepares, and what each becomes (sites.h).
_PREPARED = {SiteForm.ADDR32_CALL: SiteForm.PREPARED_6, SiteForm.CALL_REL32: SiteForm.PREPARED_5}


@dataclass(frozen=True)
class Site:
    addr: int            # link-time address of the site's first byte
    form: SiteForm       # as found in the file
    offset: int          # where its bytes are in the file
    probe: bool = False  # the shim's probe site (entry.S)


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    prepared: int        # sites written by this run
    already: int         # sites that were prepared before (a second run)
    skipped: str = ""    # why nothing was done, when nothing was

    def summary(self) -> str:
        if self.skipped:
            return f"{self.path}: sites not prepared: {self.skipped}"
        if self.prepared == 0:
            return f"{self.path}: sites already prepared ({self.already})"
        return f"{self.path}: {self.prepared} fentry sites prepared"


def unpatched_bytes(form: SiteForm, call: bytes) -> bytes:
    """The unpatched form of a call site (the last three bytes stay: sites.h)."""
    if form is SiteForm.ADDR32_CALL:
        return b"\x67\xa9" + bytes([SPIN_REL8[6]]) + call[3:6]
    if form is SiteForm.CALL_REL32:
        return b"\xa9" + bytes([SPIN_REL8[5]]) + call[2:5]
    raise ValueError(form)


def _file_offset(elf: ELFFile, addr: int, size: int) -> int | None:
    """Where the bytes at link-time address `addr` lie in the file, if in one loaded section."""
    for sec in elf.iter_sections():
        if not (sec["sh_flags"] & 0x2) or sec["sh_type"] == "SHT_NOBITS":  # SHF_ALLOC
            continue
        start = sec["sh_addr"]
        if start <= addr and addr + size <= start + sec["sh_size"]:
            return int(sec["sh_offset"] + (addr - start))
    return None


def _is_executable(elf: ELFFile) -> bool:
    """An executable: ET_EXEC, or a PIE (ET_DYN with an interpreter), not a shared library."""
    if elf["e_type"] == "ET_EXEC":
        return True
    return elf["e_type"] == "ET_DYN" and any(seg["p_type"] == "PT_INTERP"
                                             for seg in elf.iter_segments())


def find_sites(elf: ELFFile) -> list[Site]:
    """Every function whose entry calls this program's own __fentry__ directly (e8, 67 e8),
    or holds the prepared form of such a call already."""
    reader = FunctionSymbolReader(elf)
    defined = reader.fentry_addresses()
    if not defined:
        return []
    image = MemoryImage(elf)
    decoder = EntrySiteDecoder(image, FentryTarget(defined, image, DynamicRelocations(elf)))
    sites: dict[int, Site] = {}
    for sym, _file in reader.functions():
        found = decoder.decode(sym["st_value"], sym["st_size"])
        if found is None or (found.form not in _PREPARED and found.form not in _PREPARED.values()):
            continue  # not a site, or ff 15 (through the GOT): stays a call, the table serves it
        addr = sym["st_value"] + found.offset
        if found.form in _PREPARED:
            rel = struct.unpack_from("<i", found.entry, found.offset + found.length - 4)[0]
            if (addr + found.length + rel) & ((1 << 64) - 1) not in defined:
                continue  # a call of __fentry__'s PLT entry, not of this program's own
        offset = _file_offset(elf, addr, found.length)
        if offset is not None:
            sites[addr] = Site(addr, found.form, offset, sym.name == PROBE_SYMBOL)
    return sorted(sites.values(), key=lambda s: s.addr)


def _section_blob(sites: list[Site]) -> bytes:
    entries = []
    for s in sites:
        if s.addr > OFFSET_MASK:
            raise FentryError(f"a site at 0x{s.addr:x} lies beyond 2 GiB; sites cannot be "
                              "prepared for this program: build it with -Dfentry:sites=runtime")
        entries.append(s.addr | (LEN6_BIT if s.form in (SiteForm.ADDR32_CALL,
                                                         SiteForm.PREPARED_6) else 0))
    return MAGIC + struct.pack("<II", VERSION, len(entries)) + struct.pack(f"<{len(entries)}I",
                                                                            *entries)


def _objcopy() -> str:
    found = shutil.which("objcopy")
    if not found:
        raise FentryError("objcopy is not installed; install binutils, or build with "
                          "-Dfentry:sites=runtime")
    return found


def prepare(path: Path) -> PrepareResult:
    """Prepare the sites of the program at `path` in place; FentryError (one line) if it
    cannot be done."""
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            if not _is_executable(elf):
                return PrepareResult(path, 0, 0, "not an executable (shared libraries keep "
                                     "their calls)")
            sites = find_sites(elf)
            has_section = elf.get_section_by_name(SECTION) is not None
    except (OSError, *ELF_ERRORS) as e:
        raise unreadable(path, e) from None
    if not sites:
        return PrepareResult(path, 0, 0, "the program calls no __fentry__ of its own (the "
                             "shim is not linked in)")
    if not any(s.probe for s in sites):
        raise FentryError(f"{path}: the shim's {PROBE_SYMBOL} was not found: the program was "
                          "linked with a shim that cannot use prepared sites; rebuild it with "
                          "this fentry_build's subproject")
    todo = [s for s in sites if s.form in _PREPARED]
    if not todo and has_section:
        return PrepareResult(path, 0, len(sites))
    with tempfile.TemporaryDirectory(prefix=".fentry-prepare-", dir=path.parent) as tmp:
        work = Path(tmp) / path.name
        shutil.copyfile(path, work)
        with open(work, "r+b") as f:
            for s in todo:
                f.seek(s.offset)
                call = f.read(s.form.length)
                f.seek(s.offset)
                f.write(unpatched_bytes(s.form, call))
        data = Path(tmp) / "sites.bin"
        data.write_bytes(_section_blob(sites))
        verb = "--update-section" if has_section else "--add-section"
        cmd = [_objcopy(), verb, f"{SECTION}={data}", str(work)]
        if not has_section:
            cmd[3:3] = ["--set-section-flags", f"{SECTION}=contents,readonly"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            raise FentryError(f"{path}: objcopy could not write {SECTION}: {why}")
        shutil.copymode(path, work)
        os.replace(work, path)
    return PrepareResult(path, len(todo), len(sites) - len(todo))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fentry_build.build.prepare",
                                 description="Write the unpatched form of every fentry site "
                                             "into a linked program (docs/how-it-works.md).")
    ap.add_argument("program", type=Path, nargs="+")
    args = ap.parse_args(argv)
    try:
        for p in args.program:
            result = prepare(p)
            if os.environ.get("FENTRY_PREPARE_VERBOSE"):
                print(result.summary(), file=sys.stderr)
    except FentryError as e:
        print(f"fentry-prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
