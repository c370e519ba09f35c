"""client/mapped.py - the ELF files mapped into a running process, and what attach needs of each.

Each file is read as the process mapped it (the very inode, even if replaced or deleted
since) with the package's ELF reader (fentry_build.binary.dynamic, pyelftools).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from fentry_build.binary import dynamic
from fentry_build.client.procfs import Mapping
from fentry_build.errors import FentryError

FENTRY = "__fentry__"
SHIM_MARKER = "fentry_current_mode"  # exported by the shim only (fentry.h)
#: The dynamic symbols that say what an object is (LoadedObject's properties); attach reads
#: these and those its plan needs (attach_plan.SYMBOLS) of each object, no others.
CLASSIFYING_SYMBOLS = frozenset({FENTRY, SHIM_MARKER, "__libc_start_main", "malloc"})


@dataclass
class LoadedObject:
    """One ELF file mapped into the process, and what attach needs of it."""

    path: str                 # as /proc/PID/maps names it
    mappings: list[Mapping]
    base: int = 0             # load bias: run-time address = base + link-time address
    is_main: bool = False
    soname: str = ""
    entry: int = 0            # e_entry (link time)
    dynsym: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict)  # name -> (value, size, default version)
    read: frozenset[str] = CLASSIFYING_SYMBOLS  # the names looked up in .dynsym
    fentry_slots: list[int] = field(default_factory=list)  # link-time GOT slot addresses
    defines_fentry: bool = False  # in .dynsym or .symtab
    start_sym: tuple[int, int] | None = None  # _start (value, size) from .symtab

    @property
    def exec_ranges(self) -> list[tuple[int, int]]:
        return [(m.start, m.end) for m in self.mappings if m.executable]

    def definitions(self, name: str) -> list[tuple[int, int, bool]]:
        """(link-time value, size, is the default version) of each definition of `name`."""
        if name not in self.read:
            raise KeyError(f"{name} was not looked up in {self.path} (add it to the names "
                           "loaded_objects() reads)")
        return self.dynsym.get(name, [])

    def defines(self, name: str) -> bool:
        return bool(self.definitions(name))

    def address(self, name: str) -> int:
        """Run-time address of the default version of a defined dynamic symbol."""
        entries = self.definitions(name)
        if not entries:
            raise FentryError(f"{self.path} does not define {name}")
        chosen = next((e for e in entries if e[2]), entries[0])
        return self.base + chosen[0]

    @property
    def is_libc(self) -> bool:
        return self.defines("__libc_start_main")

    @property
    def is_ldso(self) -> bool:
        return self.soname.startswith("ld-linux") or Path(self.path).name.startswith("ld-linux")

    @property
    def is_allocator(self) -> bool:
        return self.defines("malloc") and not self.is_main

    @property
    def is_runtime(self) -> bool:
        """Code that may hold a lock dlopen() needs: the C runtime, the loader, an allocator
        (and glibc's libraries that were separate before 2.34)."""
        return (self.is_libc or self.is_ldso or self.is_allocator
                or self.soname.split(".so")[0] in ("libpthread", "libdl", "librt"))

    @property
    def is_shim(self) -> bool:
        return self.defines(FENTRY) and self.defines(SHIM_MARKER)


def _read_symtab(elf: ELFFile, obj: LoadedObject) -> None:
    """The program's own __fentry__ and _start, from .symtab (when it is not stripped)."""
    found = dynamic.symtab_definitions(elf, (FENTRY, "_start"))
    if found.get(FENTRY):
        obj.defines_fentry = True
    if found.get("_start"):
        obj.start_sym = found["_start"][-1]


def _open_mapped(pid: int, obj: LoadedObject) -> Any:
    """The file behind a mapping: the very inode mapped, even if replaced or deleted since."""
    first = min(obj.mappings, key=lambda m: m.start)
    candidates = []
    if obj.is_main:
        candidates.append(f"/proc/{pid}/exe")
    candidates.append(f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}")
    if not obj.path.endswith(" (deleted)"):
        candidates.append(f"/proc/{pid}/root{obj.path}")
    for c in candidates:
        try:
            f = open(c, "rb")
        except OSError:
            continue
        if os.fstat(f.fileno()).st_ino == first.inode:
            return f
        f.close()
    raise FentryError(f"cannot read {obj.path} as mapped into process {pid}")


def loaded_objects(pid: int, maps: list[Mapping],
                   symbols: frozenset[str] = CLASSIFYING_SYMBOLS) -> list[LoadedObject]:
    """The ELF files mapped into `pid`, with the definitions of `symbols` (and of
    CLASSIFYING_SYMBOLS) in each.  One that cannot be read is left out, except the program
    itself."""
    symbols = symbols | CLASSIFYING_SYMBOLS
    exe = os.readlink(f"/proc/{pid}/exe") if os.path.exists(f"/proc/{pid}/exe") else ""
    groups: dict[str, list[Mapping]] = {}
    for m in maps:
        if m.path.startswith("/") and m.inode:
            groups.setdefault(m.path, []).append(m)
    objects = []
    for path, mappings in groups.items():
        if not any(m.offset == 0 for m in mappings):
            continue
        obj = LoadedObject(path, mappings, is_main=(path == exe), read=symbols)
        try:
            with _open_mapped(pid, obj) as f:
                if f.read(4) != b"\x7fELF":
                    continue
                f.seek(0)
                elf = ELFFile(f)
                if elf["e_machine"] != "EM_X86_64":
                    continue
                obj.entry = elf["e_entry"]
                obj.soname = dynamic.soname(elf)
                zero = min((m for m in mappings if m.offset == 0), key=lambda m: m.start)
                obj.base = zero.start - dynamic.first_load_vaddr(elf) if elf["e_type"] == "ET_DYN" else 0
                obj.dynsym = dynamic.dynamic_symbols(elf, symbols)
                obj.defines_fentry = FENTRY in obj.dynsym
                if obj.is_main:
                    _read_symtab(elf, obj)
                if not obj.defines_fentry and not obj.is_runtime:
                    obj.fentry_slots = dynamic.got_slots(elf, FENTRY)
        except FentryError:
            if obj.is_main:
                raise
            continue
        except (ELFError, OSError, struct.error, ValueError, KeyError):
            continue
        objects.append(obj)
    return objects


__all__ = ["CLASSIFYING_SYMBOLS", "FENTRY", "SHIM_MARKER", "LoadedObject", "loaded_objects"]
