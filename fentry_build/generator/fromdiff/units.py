"""units.py - the translation units linked into the running binary, matched to compile lines.

The binary's DWARF names each compile unit (DW_AT_name, relative to DW_AT_comp_dir):
those are the sources of the build that is running.  A compile database lists every
target of the build folder (tests, other programs, the patches themselves); only the
entries whose source is one of the binary's units are recompiled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fentry_build.binary.dwarf import DWARF_ERRORS, text, unit_name
from fentry_build.binary.program import Program
from fentry_build.errors import FentryError

from fentry_build.generator.compile_db import CompileEntry, normal


def unit_sources(binary: Program) -> list[Path]:
    """The source file of each compile unit of `binary`, absolute."""
    found: list[Path] = []
    try:
        dwarf = binary.dwarf
        if dwarf is None:
            raise FentryError(f"{binary.name} has no DWARF: the generator finds its sources "
                              "through it; build it with -g (dependency('fentry') and the SCons tool add it)")
        for cu in dwarf.units():
            name = unit_name(cu)
            if not name or name.startswith("<"):
                continue
            top = cu.get_top_DIE().attributes
            comp_dir = text(top["DW_AT_comp_dir"].value) if "DW_AT_comp_dir" in top else "/"
            found.append(normal(name, comp_dir))
    except OSError as e:
        raise FentryError(f"cannot read {binary.path}: {e.strerror or e}; pass the built program") from None
    except DWARF_ERRORS as e:
        raise FentryError(f"cannot read the DWARF of {binary.name} ({e}); rebuild it with -g") from None
    return found


def binary_entries(binary: Program, entries: Sequence[CompileEntry]) -> list[CompileEntry]:
    """The compile entries of the units linked into `binary`, in the database's order."""
    sources = set(unit_sources(binary))
    chosen: dict[Path, CompileEntry] = {}
    for e in entries:  # a source built into several targets: its first compile line
        if e.file in sources:
            chosen.setdefault(e.file, e)
    if not chosen:
        c_units = sorted(str(s) for s in sources if s.suffix == ".c")
        sample = ", ".join(c_units[:3]) or "none"
        raise FentryError(f"no entry of the compile database compiles a source of {binary.name} "
                          f"(its units: {sample}); pass --build-dir the build folder of this binary")
    return list(chosen.values())
