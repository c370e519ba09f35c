"""binary/dynamic.py - the dynamic side of an ELF file, as a process maps it (pyelftools).

What attach needs of each file mapped into a running process: its defined dynamic symbols
(with their default version), the GOT slots the dynamic loader fills with a symbol's
address, its soname and the link-time address of its first PT_LOAD.  The same reader
(pyelftools) as the generator's; nothing here decodes ELF structures by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.gnuversions import GNUVerSymSection
from elftools.elf.hash import GNUHashSection
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

# Relocations that make a GOT slot hold the address of a named symbol.
SLOT_RELOCS = frozenset({ENUM_RELOC_TYPE_x64["R_X86_64_GLOB_DAT"],
                         ENUM_RELOC_TYPE_x64["R_X86_64_JUMP_SLOT"]})
# STT_GNU_IFUNC is 10, which pyelftools names STT_LOOS.
DEFINED_KINDS = frozenset({"STT_OBJECT", "STT_FUNC", "STT_GNU_IFUNC", "STT_LOOS"})
VERSYM_HIDDEN = 0x8000  # `name@VERSION`, not the default `name@@VERSION`

#: name -> [(st_value, st_size, is the default version)], for each defined symbol
DynamicSymbols = dict[str, list[tuple[int, int, bool]]]


def _hidden(versym: Any, index: int) -> bool:
    if not isinstance(versym, GNUVerSymSection) or index >= versym.num_symbols():
        return False
    ndx = versym.get_symbol(index)["ndx"]
    return isinstance(ndx, int) and bool(ndx & VERSYM_HIDDEN)


def _hashed_indices(elf: ELFFile, dynsym: SymbolTableSection, names: frozenset[str]) -> list[int] | None:
    """The .dynsym indices that may define one of `names`, found through .gnu.hash as the
    dynamic loader finds them (None without one: then every symbol is a candidate).

    The table's symbols are sorted by bucket (hash % nbuckets), each bucket's run starting at
    its bucket's index: a name's definitions - every version of it - are in its bucket's run.
    """
    table = elf.get_section_by_name(".gnu.hash")
    if not isinstance(table, GNUHashSection):
        return None
    buckets, nbuckets = table.params["buckets"], table.params["nbuckets"]
    if not nbuckets:
        return []
    count = dynsym.num_symbols()
    indices: set[int] = set()
    for bucket in {GNUHashSection.gnu_hash(name) % nbuckets for name in names}:
        index = buckets[bucket]
        while 0 < index < count:
            if GNUHashSection.gnu_hash(dynsym.get_symbol(index).name) % nbuckets != bucket:
                break
            indices.add(index)
            index += 1
    return sorted(indices)


def dynamic_symbols(elf: ELFFile, names: frozenset[str]) -> DynamicSymbols:
    """The definitions of `names` (functions and objects) in .dynsym, each with whether its
    version is the default.  Only these, looked up through the GNU hash table: reading every
    symbol of a C library (3,000, each with its version) took half a second of each attach."""
    dynsym = elf.get_section_by_name(".dynsym")
    found: DynamicSymbols = {}
    if not isinstance(dynsym, SymbolTableSection):
        return found
    versym = elf.get_section_by_name(".gnu.version")
    candidates = _hashed_indices(elf, dynsym, names)
    for index in range(dynsym.num_symbols()) if candidates is None else candidates:
        sym = dynsym.get_symbol(index)
        if (index == 0 or sym.name not in names or sym["st_shndx"] == "SHN_UNDEF"
                or sym["st_info"]["type"] not in DEFINED_KINDS):
            continue
        found.setdefault(sym.name, []).append(
            (int(sym["st_value"]), int(sym["st_size"]), not _hidden(versym, index)))
    return found


def symtab_definitions(elf: ELFFile, names: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    """(st_value, st_size) of each definition of `names` in .symtab (none when stripped)."""
    symtab = elf.get_section_by_name(".symtab")
    found: dict[str, list[tuple[int, int]]] = {}
    if not isinstance(symtab, SymbolTableSection):
        return found
    for name in names:
        for sym in symtab.get_symbol_by_name(name) or []:
            if sym["st_shndx"] != "SHN_UNDEF":
                found.setdefault(name, []).append((int(sym["st_value"]), int(sym["st_size"])))
    return found


def got_slots(elf: ELFFile, symbol: str) -> list[int]:
    """Link-time addresses of the GOT slots the dynamic loader fills with `symbol`'s address."""
    slots = []
    for sec in elf.iter_sections():
        if not isinstance(sec, RelocationSection) or not sec["sh_flags"] & 0x2:
            continue
        symtab = elf.get_section(sec["sh_link"]) if sec["sh_link"] else None
        if not isinstance(symtab, SymbolTableSection):
            continue
        for rel in sec.iter_relocations():
            if rel["r_info_type"] in SLOT_RELOCS and rel["r_info_sym"] and \
                    symtab.get_symbol(rel["r_info_sym"]).name == symbol:
                slots.append(int(rel["r_offset"]))
    return slots


def soname(elf: ELFFile) -> str:
    for sec in elf.iter_sections():
        if isinstance(sec, DynamicSection):
            for tag in sec.iter_tags():
                if tag.entry.d_tag == "DT_SONAME":
                    return str(getattr(tag, "soname", ""))
    return ""


def first_load_vaddr(elf: ELFFile) -> int:
    """The page-aligned link-time address of the file's first byte (its lowest-offset PT_LOAD)."""
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    if not loads:
        raise ELFError("no PT_LOAD segment")
    first = min(loads, key=lambda s: s["p_offset"])
    return int(first["p_vaddr"] - first["p_offset"]) & ~0xFFF


__all__ = ["DynamicSymbols", "dynamic_symbols", "first_load_vaddr", "got_slots", "soname",
           "symtab_definitions"]
