"""objdiff.py - which functions and variables differ between two objects of one unit.

Both objects are compiled with -ffunction-sections -fdata-sections, so each function and
variable sits in a section of its own and its bytes do not move when a neighbour grows.
A function is compared as its bytes with every relocated field zeroed, plus its
relocations (offset, type and what they point at).  What a relocation points at is
named so that layout does not matter: a symbol by its name and addend; a string literal
by its text (string sections are merged and reordered); a constant pool entry by its
bytes; a function or variable reached through its section symbol by that function or
variable.  Everything is read with pyelftools.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Section, Symbol, SymbolTableSection

from fentry_build.binary.elf import CloneName

_NAMES = {v: k for k, v in ENUM_RELOC_TYPE_x64.items()}
WIDE_RELOCS = frozenset({"R_X86_64_64", "R_X86_64_PC64", "R_X86_64_GOTOFF64", "R_X86_64_DTPOFF64",
                         "R_X86_64_TPOFF64", "R_X86_64_GOTPC64", "R_X86_64_GOTPCREL64"})

RelocKey = tuple[int, str, tuple[object, ...]]


def _pc_relative(kind: str) -> bool:
    return "PC" in kind or kind.endswith("PLT32") or "GOTTPOFF" in kind or kind.endswith("TLSGD") \
        or kind.endswith("TLSLD")


def _width(kind: str) -> int:
    return 8 if kind in WIDE_RELOCS else 4


def static_base(name: str) -> str:
    """A function's static local `count.3` compares as `count` (GCC's numbering may shift)."""
    base, dot, number = name.rpartition(".")
    return base if dot and number.isdigit() and base else name


@dataclass(frozen=True)
class Definition:
    """One function or variable of an object, ready to compare."""

    name: str
    kind: str            # "function" or "variable"
    local: bool
    size: int
    readonly: bool       # .rodata, .data.rel.ro (variables); True for code
    tls: bool
    masked: bytes        # its bytes, relocated fields zeroed (NOBITS: empty)
    relocs: tuple[RelocKey, ...]

    @property
    def base(self) -> str:
        """The source function or variable it belongs to (f for f.constprop.0, f.cold; x for x.0)."""
        if self.kind == "function":
            parsed = CloneName.parse(self.name)
            return parsed.base if parsed.is_clone else self.name
        return static_base(self.name)

    def same_as(self, other: Definition) -> bool:
        return (self.size, self.masked, self.relocs) == (other.size, other.masked, other.relocs)


class ObjectReader:
    """The functions and variables defined in one relocatable object."""

    def __init__(self, elf: ELFFile) -> None:
        self._elf = elf
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise ValueError("no .symtab")
        self._symbols: list[Symbol] = list(symtab.iter_symbols())
        self._by_section: dict[int, list[Symbol]] = {}
        for sym in self._symbols:
            if isinstance(sym["st_shndx"], int) and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT",
                                                                               "STT_TLS"):
                self._by_section.setdefault(sym["st_shndx"], []).append(sym)
        self._relocs: dict[int, RelocationSection] = {}
        for sec in elf.iter_sections():
            if isinstance(sec, RelocationSection):
                self._relocs[sec["sh_info"]] = sec

    def definitions(self) -> Iterator[Definition]:
        for sym in self._symbols:
            kind = sym["st_info"]["type"]
            shndx = sym["st_shndx"]
            if kind not in ("STT_FUNC", "STT_OBJECT", "STT_TLS"):
                continue
            local = sym["st_info"]["bind"] == "STB_LOCAL"
            if shndx == "SHN_COMMON":
                yield Definition(sym.name, "variable", local, sym["st_size"], False, False, b"", ())
            elif isinstance(shndx, int) and shndx != 0:
                yield self._definition(sym, shndx, "function" if kind == "STT_FUNC" else "variable")

    def _definition(self, sym: Symbol, shndx: int, kind: str) -> Definition:
        sec = self._elf.get_section(shndx)
        start, size = sym["st_value"], sym["st_size"]
        nobits = sec["sh_type"] == "SHT_NOBITS"
        data = bytearray(b"" if nobits else sec.data()[start:start + size])
        keys: list[RelocKey] = []
        rel = self._relocs.get(shndx)
        if rel is not None:
            for r in rel.iter_relocations():
                offset = r["r_offset"] - start
                if not 0 <= offset < max(size, 1):
                    continue
                type_name = _NAMES.get(r["r_info_type"], str(r["r_info_type"]))
                width = _width(type_name)
                data[offset:offset + width] = bytes(min(width, max(0, len(data) - offset)))
                keys.append((offset, type_name, self._target(r["r_info_sym"], r["r_addend"], type_name)))
        flags = sec["sh_flags"]
        readonly = kind == "function" or not flags & SH_FLAGS.SHF_WRITE \
            or sec.name.startswith(".data.rel.ro")
        return Definition(sym.name, kind, sym["st_info"]["bind"] == "STB_LOCAL", size, bool(readonly),
                          sym["st_info"]["type"] == "STT_TLS" or bool(flags & SH_FLAGS.SHF_TLS),
                          bytes(data), tuple(sorted(keys, key=lambda k: (k[0], k[1]))))

    def _target(self, index: int, addend: int, type_name: str) -> tuple[object, ...]:
        sym = self._symbols[index]
        kind = sym["st_info"]["type"]
        shndx = sym["st_shndx"]
        named = kind in ("STT_FUNC", "STT_OBJECT", "STT_TLS") or (
            kind == "STT_NOTYPE" and sym["st_info"]["bind"] != "STB_LOCAL") or not isinstance(shndx, int)
        if named:
            name = static_base(sym.name) if sym["st_info"]["bind"] == "STB_LOCAL" else sym.name
            return ("symbol", name, addend)
        # A section symbol or a local label (.LC0): what lies at the address it points to.
        sec = self._elf.get_section(shndx)
        at = sym["st_value"] + addend + (4 if _pc_relative(type_name) else 0)
        return self._contents(sec, shndx, at)

    def _contents(self, sec: Section, shndx: int, at: int) -> tuple[object, ...]:
        flags = sec["sh_flags"]
        if flags & SH_FLAGS.SHF_MERGE and flags & SH_FLAGS.SHF_STRINGS:
            data = sec.data()
            begin = data.rfind(b"\0", 0, max(at, 0)) + 1 if at > 0 else 0
            end = data.find(b"\0", max(at, 0))
            return ("string", data[begin:end if end >= 0 else len(data)], at - begin)
        if flags & SH_FLAGS.SHF_MERGE and sec["sh_entsize"]:
            size = sec["sh_entsize"]
            start = at - at % size
            return ("constant", sec.data()[start:start + size], at - start)
        for sym in self._by_section.get(shndx, []):
            if sym["st_value"] <= at < sym["st_value"] + max(sym["st_size"], 1):
                return ("symbol", static_base(sym.name), at - sym["st_value"])
        return ("section", sec.name, at)


def read_object(path: Path) -> dict[tuple[str, str], Definition]:
    """The definitions of the object at `path`, by (kind, name)."""
    with open(path, "rb") as stream:
        reader = ObjectReader(ELFFile(stream))
        return {(d.kind, d.name): d for d in reader.definitions()}


@dataclass
class UnitDiff:
    """What differs between the original and the fixed object of one unit (source names)."""

    changed_functions: set[str] = field(default_factory=set)
    new_functions: set[str] = field(default_factory=set)
    removed_functions: set[str] = field(default_factory=set)
    changed_variables: dict[str, Definition] = field(default_factory=dict)  # fixed definitions
    new_variables: dict[str, Definition] = field(default_factory=dict)
    fixed: dict[tuple[str, str], Definition] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.changed_functions or self.new_functions or self.changed_variables
                    or self.new_variables)


def diff_objects(original: Path, fixed: Path) -> UnitDiff:
    """Compare two objects of one unit, symbol by symbol."""
    old, new = read_object(original), read_object(fixed)
    result = UnitDiff(fixed=new)
    old_bases = {(k, d.base) for (k, _), d in old.items()}
    new_bases = {(k, d.base) for (k, _), d in new.items()}
    old_by_base: dict[tuple[str, str], list[Definition]] = {}
    for (k, _), d in old.items():
        old_by_base.setdefault((k, d.base), []).append(d)
    for key, d in new.items():
        before = old.get(key)
        same_base = old_by_base.get((d.kind, d.base), [])
        if before is None and d.kind == "variable" and len(same_base) == 1:
            before = same_base[0]  # a static local GCC numbered differently
        if d.kind == "function":
            if (d.kind, d.base) not in old_bases:
                result.new_functions.add(d.base)
            elif before is None or not before.same_as(d):
                result.changed_functions.add(d.base)
        elif (d.kind, d.base) not in old_bases:
            result.new_variables[d.base] = d
        elif before is None or not before.same_as(d):
            result.changed_variables[d.base] = d
    for key, d in old.items():
        if d.kind == "function" and (d.kind, d.base) not in new_bases:
            result.removed_functions.add(d.base)
        elif d.kind == "function" and key not in new and (d.kind, d.base) in new_bases:
            result.changed_functions.add(d.base)  # a clone or a cold part went away
    return result
