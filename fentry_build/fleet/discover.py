"""fleet/discover.py - the processes of this host that carry the fentry shim, found in /proc.

A process carries the shim when its executable defines the shim's marker symbol (the shim
linked in: ``dependency('fentry')``) or when ``libfentry.so`` is mapped into it (preloaded
with ``LD_PRELOAD``, or loaded by ``fentry-build attach``).  Only the processes whose maps
the caller may read are seen: a user's own, or all of them for root.

Each distinct ELF file is read once per scan, keyed by (device, inode, mtime): a host
running a hundred workers of one server reads its executable once.  What a process
*runs* - the build-ids of its executable and of every ELF file mapped into it - is what
``--build-id`` and a patch's build-id are matched against, so a patch of a shared library
finds the processes that load that library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from fentry_build.binary import dynamic
from fentry_build.binary.elf import ELF_ERRORS, BuildIdReader
from fentry_build.client import procfs
from fentry_build.errors import FentryError

#: What the shim defines, linked into a program: fentry_current_mode (fentry.h); a program
#: stripped of .symtab still exports fentry_shadow_get (build/flags.py's link arguments).
SHIM_SYMBOLS = ("fentry_current_mode", "fentry_shadow_get")
#: The shared shim's file name (build/sharedshim.py, LIBRARY_NAME).
SHIM_LIBRARY = "libfentry.so"

FileKey = tuple[int, int, int]  # st_dev, st_ino, st_mtime_ns


@dataclass(frozen=True)
class ElfFacts:
    """What a scan needs of one ELF file."""

    build_id: str | None  # hex
    defines_shim: bool


@dataclass(frozen=True)
class Found:
    """One process that carries the shim."""

    pid: int
    program: str            # its executable, as /proc/PID/exe names it
    build_id: str | None    # the executable's
    how: str                # "linked", "preloaded" or "attached"
    runs: frozenset[str] = field(default_factory=frozenset)  # build-ids of every mapped ELF file

    def runs_build(self, build_id: str) -> bool:
        return build_id.lower() in self.runs


def _defines(elf: ELFFile, names: tuple[str, ...], section: str) -> bool:
    symtab = elf.get_section_by_name(section)
    if not isinstance(symtab, SymbolTableSection):
        return False
    return any(sym["st_shndx"] != "SHN_UNDEF"
               for name in names for sym in symtab.get_symbol_by_name(name) or [])


def _links_shim(elf: ELFFile) -> bool:
    """Does the file define the shim: exported (found through .gnu.hash, as attach finds
    symbols), else in .symtab (read whole: only when it is not exported)?"""
    return bool(dynamic.dynamic_symbols(elf, frozenset(SHIM_SYMBOLS))) \
        or _defines(elf, SHIM_SYMBOLS[:1], ".symtab")


def read_facts(path: str, shim: bool = True) -> ElfFacts | None:
    """The build-id of the ELF file at `path` and (if `shim`) whether the shim is linked into it."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            build_id = BuildIdReader.read(elf)
            linked = shim and _links_shim(elf)
            return ElfFacts(build_id.hex() if build_id is not None else None, linked)
    except (OSError, *ELF_ERRORS):
        return None


class ElfCache:
    """ElfFacts per file, keyed by (device, inode, mtime): each file is read once."""

    def __init__(self) -> None:
        self._facts: dict[tuple[FileKey, bool], ElfFacts | None] = {}

    def facts(self, path: str, shim: bool = False) -> ElfFacts | None:
        """The file's facts; `shim`: whether it links the shim too (asked of executables)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = ((st.st_dev, st.st_ino, st.st_mtime_ns), shim)
        if key not in self._facts:
            self._facts[key] = read_facts(path, shim)
        return self._facts[key]


def _mapped_files(maps: list[procfs.Mapping]) -> dict[str, int]:
    """path -> inode of each file mapped from its start (an ELF file's first segment)."""
    files: dict[str, int] = {}
    for m in maps:
        if m.path.startswith("/") and m.inode and m.offset == 0:
            files.setdefault(m.path, m.inode)
    return files


def _reachable(pid: int, path: str, inode: int) -> str | None:
    """A path that opens the very file mapped (same inode), seen through the process's root."""
    name = path.removesuffix(" (deleted)")
    for candidate in (procfs.in_root(pid, name), name):
        try:
            if os.stat(candidate).st_ino == inode:
                return candidate
        except OSError:
            continue
    return None


def _preloaded(pid: int, library: str) -> bool:
    env = procfs.read_environ(pid) or {}
    names = env.get("LD_PRELOAD", "").replace(":", " ").split()
    return any(n == library or Path(n).name == Path(library).name for n in names)


def examine(pid: int, cache: ElfCache) -> Found | None:
    """The process `pid` if it carries the shim (and we may look at it), else None."""
    program = procfs.read_exe(pid)
    if program is None:
        return None  # gone, a kernel thread, or another user's
    try:
        maps = procfs.read_maps(pid)
    except FentryError:
        return None
    exe = cache.facts(procfs.exe_link(pid), shim=True)
    files = _mapped_files(maps)
    library = next((p for p in files if Path(p.removesuffix(" (deleted)")).name == SHIM_LIBRARY), None)
    if exe is not None and exe.defines_shim:
        how = "linked"
    elif library is not None:
        how = "preloaded" if _preloaded(pid, library) else "attached"
    else:
        return None
    runs = {exe.build_id} if exe is not None and exe.build_id else set()
    for path, inode in files.items():
        where = _reachable(pid, path, inode)
        facts = cache.facts(where) if where else None
        if facts is not None and facts.build_id:
            runs.add(facts.build_id)
    return Found(pid, program, exe.build_id if exe else None, how,
                 frozenset(runs))


def same_program(found: Found, program: str) -> bool:
    """Is `found` running the executable `program` (a path: compared by file, else by name)?"""
    if found.program == os.path.realpath(program):
        return True  # also when the file was replaced since the process started
    try:
        want = os.stat(program)
        have = os.stat(procfs.exe_link(found.pid))
    except OSError:
        return False
    return (want.st_dev, want.st_ino) == (have.st_dev, have.st_ino)


def scan(*, program: str | None = None, build_id: str | None = None,
         cache: ElfCache | None = None) -> list[Found]:
    """Every process carrying the shim that we may see, by pid; filtered by executable
    (`program`, a path) and by a build-id the process runs (`build_id`, hex)."""
    cache = cache or ElfCache()
    found = []
    me = os.getpid()
    for pid in procfs.pids():
        f = examine(pid, cache) if pid != me else None
        if f is None:
            continue
        if program is not None and not same_program(f, program):
            continue
        if build_id is not None and not f.runs_build(build_id):
            continue
        found.append(f)
    return found


__all__ = ["ElfCache", "ElfFacts", "Found", "SHIM_LIBRARY", "SHIM_SYMBOLS", "examine", "read_facts",
           "same_program", "scan"]
