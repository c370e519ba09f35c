"""binary/dwarf.py - the program's DWARF (-g) as fentry_build reads it: functions, their origins, variables, files.

Everything goes through pyelftools' DWARF API; nothing here decodes .debug_* bytes by
hand.  Two facts of GCC's output (DWARF 4 and 5) shape the code:

- A function that is inlined anywhere gets an *abstract instance* DIE (DW_AT_inline)
  holding its name, type and parameters.  Its out-of-line body, each IPA clone
  (f.constprop.0 ...) and each inlined copy (DW_TAG_inlined_subroutine) point at it
  through DW_AT_abstract_origin; a definition after a declaration points at the
  declaration through DW_AT_specification.  Following both to the end of the chain
  gives one DIE per source function: its *origin*.
- Without LTO a function is inlined only within its own translation unit, so one
  compile unit holds every inlined copy of its functions.  LTO units are named
  "<artificial>" and share functions between them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import cast

from elftools.dwarf.aranges import ARanges
from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.dwarfinfo import DWARFInfo
from elftools.dwarf.ranges import BaseAddressEntry, RangeEntry
from elftools.elf.elffile import ELFFile

from fentry_build.binary.elf import DWARF_ERRORS, has_debug_info

LTO_UNIT_NAME = "<artificial>"
ORIGIN_ATTRIBUTES = ("DW_AT_abstract_origin", "DW_AT_specification")
MAX_ORIGIN_CHAIN = 16  # a longer chain is a loop in broken debug info
CALL_SITE_TAGS = frozenset({"DW_TAG_call_site", "DW_TAG_GNU_call_site"})
CALL_TARGET_ATTRIBUTES = ("DW_AT_call_origin", "DW_AT_abstract_origin")  # DWARF 5, GNU DWARF 4
CALL_PC_ATTRIBUTES = ("DW_AT_call_return_pc", "DW_AT_call_pc", "DW_AT_low_pc")


def text(value: object) -> str:
    """An attribute's string value (pyelftools gives bytes)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def origin(die: DIE) -> DIE:
    """The DIE at the end of die's DW_AT_abstract_origin / DW_AT_specification chain."""
    for _ in range(MAX_ORIGIN_CHAIN):
        attr = next((a for a in ORIGIN_ATTRIBUTES if a in die.attributes), None)
        if attr is None:
            return die
        die = die.get_DIE_from_attribute(attr)
    return die


def origin_chain(die: DIE) -> Iterator[DIE]:
    """die, then each DIE its DW_AT_abstract_origin / DW_AT_specification leads to."""
    for _ in range(MAX_ORIGIN_CHAIN):
        yield die
        attr = next((a for a in ORIGIN_ATTRIBUTES if a in die.attributes), None)
        if attr is None:
            return
        die = die.get_DIE_from_attribute(attr)


def may_be_inlined(die: DIE) -> bool:
    """Has GCC inlined (or been asked to inline) the function of this concrete DIE?

    GCC describes such a function by an abstract instance (DW_AT_inline) that its body
    points at with DW_AT_abstract_origin; a function never inlined has neither.
    """
    return any("DW_AT_abstract_origin" in d.attributes or "DW_AT_inline" in d.attributes
               for d in origin_chain(die))


def attribute(die: DIE, name: str) -> object | None:
    """The first value of attribute `name` along die's origin chain (names, types live there)."""
    for d in origin_chain(die):
        if name in d.attributes:
            value: object = d.attributes[name].value
            return value
    return None


def die_name(die: DIE) -> str | None:
    value = attribute(die, "DW_AT_name")
    return text(value) if value is not None else None


def unit_of(die: DIE) -> CompileUnit:
    """The unit holding `die`.  Every DIE read here comes from .debug_info (GCC puts no
    function or variable in a .debug_types type unit), so it is a compile unit."""
    return cast(CompileUnit, die.cu)


def unit_name(cu: CompileUnit) -> str | None:
    value = cu.get_top_DIE().attributes.get("DW_AT_name")
    return text(value.value) if value is not None else None


@dataclass(frozen=True)
class ProgramDwarf:
    """The DWARF of one ELF file that is open for reading (pyelftools reads lazily)."""

    info: DWARFInfo

    @staticmethod
    def of(elf: ELFFile) -> ProgramDwarf | None:
        """The DWARF of `elf`, or None when it was built without -g."""
        if not has_debug_info(elf):
            return None
        try:
            return ProgramDwarf(elf.get_dwarf_info())
        except DWARF_ERRORS:
            return None

    def units(self) -> Iterator[CompileUnit]:
        return self.info.iter_CUs()

    # ---- addresses -----------------------------------------------------------------------

    def code_address(self, die: DIE) -> int | None:
        """Where die's code starts: DW_AT_low_pc, DW_AT_entry_pc or its first range; None if it
        has no code (an abstract instance, a copy optimised away)."""
        attrs = die.attributes
        for name in ("DW_AT_entry_pc", "DW_AT_low_pc"):
            if name in attrs and attrs[name].form.startswith("DW_FORM_addr"):
                return int(attrs[name].value)
        if "DW_AT_ranges" in attrs:
            return self._first_range_start(die)
        return None

    def _first_range_start(self, die: DIE) -> int | None:
        cu = unit_of(die)
        top = cu.get_top_DIE().attributes
        base = int(top["DW_AT_low_pc"].value) if "DW_AT_low_pc" in top else 0
        ranges = self.info.range_lists()
        if ranges is None:
            return None
        for entry in ranges.get_range_list_at_offset(die.attributes["DW_AT_ranges"].value, cu=cu):
            if isinstance(entry, BaseAddressEntry):
                base = entry.base_address
            elif isinstance(entry, RangeEntry) and entry.end_offset > entry.begin_offset:
                return int(entry.begin_offset if entry.is_absolute else base + entry.begin_offset)
        return None

    @cached_property
    def _aranges(self) -> ARanges | None:
        """.debug_aranges, read once (pyelftools reads the whole table at each get_aranges())."""
        return self.info.get_aranges()

    def unit_at(self, addr: int) -> CompileUnit | None:
        """The compile unit whose code covers `addr` (.debug_aranges), if that table exists."""
        aranges = self._aranges
        if aranges is None or not aranges.entries:
            return None
        offset = aranges.cu_offset_at_addr(addr)
        return self.info.get_CU_at(offset) if offset is not None else None

    @cached_property
    def _unit_functions(self) -> dict[int, dict[int, DIE]]:
        """Per unit (by offset, filled as units are asked for): its top-level functions by
        start address.  A generator run asks for K functions: one pass over each unit they
        are in, not one per function."""
        return {}

    def _functions_of(self, cu: CompileUnit) -> dict[int, DIE]:
        found = self._unit_functions.get(cu.cu_offset)
        if found is None:
            found = {}
            for die in cu.get_top_DIE().iter_children():  # other subtrees skipped (DW_AT_sibling)
                if die.tag == "DW_TAG_subprogram":
                    low = die.attributes.get("DW_AT_low_pc")
                    start = int(low.value) if low is not None else (
                        self.code_address(die) if "DW_AT_ranges" in die.attributes else None)
                    if start is not None:
                        found.setdefault(start, die)
            self._unit_functions[cu.cu_offset] = found
        return found

    def subprogram_at(self, addr: int) -> DIE | None:
        """The DW_TAG_subprogram whose code starts at `addr` (a concrete function or clone)."""
        unit = self.unit_at(addr)
        units = [unit] if unit is not None else list(self.units())
        for cu in units:  # functions are children of the unit
            die = self._functions_of(cu).get(addr)
            if die is not None:
                return die
        for cu in units:  # GNU C nested functions sit deeper
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_subprogram" and self._starts_at(die, addr):
                    return die
        return None

    def _starts_at(self, die: DIE, addr: int) -> bool:
        low = die.attributes.get("DW_AT_low_pc")
        if low is not None:
            return int(low.value) == addr
        return "DW_AT_ranges" in die.attributes and self.code_address(die) == addr

    def units_sharing_code_with(self, cu: CompileUnit) -> list[CompileUnit]:
        """The units that can hold inlined copies of cu's functions: cu, or every LTO unit."""
        if unit_name(cu) != LTO_UNIT_NAME:
            return [cu]
        return [u for u in self.units() if unit_name(u) == LTO_UNIT_NAME]

    # ---- variables -----------------------------------------------------------------------

    def variable_address(self, die: DIE) -> int | None:
        """The static address of a variable (its DW_AT_location is DW_OP_addr), or None."""
        loc = die.attributes.get("DW_AT_location")
        if loc is None or loc.form not in ("DW_FORM_exprloc", "DW_FORM_block1", "DW_FORM_block"):
            return None
        ops = DWARFExprParser(die.cu.structs).parse_expr(loc.value)
        if len(ops) == 1 and ops[0].op_name == "DW_OP_addr":
            return int(ops[0].args[0])
        return None

    def variables_named(self, name: str) -> Iterator[tuple[DIE, str | None]]:
        """Each definition (not declaration) of a variable called `name`, with its unit's file."""
        for cu in self.units():
            file = unit_name(cu)
            for die in cu.iter_DIEs():
                if (die.tag == "DW_TAG_variable" and "DW_AT_declaration" not in die.attributes
                        and die_name(die) == name):
                    yield die, file

    def variable_at(self, addr: int) -> DIE | None:
        """The definition of the variable at static address `addr` (a static local too)."""
        for cu in self.units():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_variable" and self.variable_address(die) == addr:
                    return die
        return None

    def file_of_variable_at(self, addr: int) -> str | None:
        """The source file that defines the variable at `addr` (for a global's qualifier)."""
        for cu in self.units():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_variable" and self.variable_address(die) == addr:
                    return unit_name(cu)
        return None

    # ---- source files --------------------------------------------------------------------

    def decl_file(self, die: DIE) -> str | None:
        """The full path of the file that declares `die` (DW_AT_decl_file), when known."""
        index = attribute(die, "DW_AT_decl_file")
        if not isinstance(index, int):
            return None
        cu = unit_of(die)
        program = self.info.line_program_for_CU(cu)
        if program is None:
            return None
        header = program.header
        version = header["version"]
        files, dirs = header["file_entry"], header["include_directory"]
        entry_index = index if version >= 5 else index - 1
        if not 0 <= entry_index < len(files):
            return None
        entry = files[entry_index]
        name = text(entry.name)
        if name.startswith("<"):
            return None  # <built-in>: declared by the compiler itself
        dir_index = entry.dir_index
        top = cu.get_top_DIE().attributes
        comp_dir = text(top["DW_AT_comp_dir"].value) if "DW_AT_comp_dir" in top else ""
        if version >= 5:
            directory = text(dirs[dir_index]) if 0 <= dir_index < len(dirs) else ""
        else:
            directory = comp_dir if dir_index == 0 else (
                text(dirs[dir_index - 1]) if dir_index - 1 < len(dirs) else "")
        path = posixpath.join(directory, name)
        return posixpath.normpath(posixpath.join(comp_dir, path))


__all__ = ["DWARF_ERRORS", "ProgramDwarf", "attribute", "die_name", "may_be_inlined", "origin",
           "origin_chain", "text", "unit_name", "unit_of"]
