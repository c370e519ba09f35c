"""generator/inline.py - where else a replaced function's code runs: inlined copies (DWARF) and IPA clones (.symtab).

Patching `f` redirects calls that reach f's own fentry site.  Two kinds of copies never
reach it (docs/measurements.md): a copy GCC *inlined* into a caller, and an *IPA clone*
(f.constprop.0, f.isra.0, f.part.0) that callers call instead of f.  The generator asks
this module, for each function a patch replaces, which callers hold such copies, and
warns (or, strict, fails) with their names and the fix.

Inlined copies are DW_TAG_inlined_subroutine entries whose origin is f's (dwarf.origin);
the function holding one is found by its code address in .symtab, so a copy inside a
clone is named by the clone's symbol and one in a `.cold` part by its function.  A
clone's callers are the DW_TAG_call_site entries that name the clone.

DWARF does not record every inlined copy: a copy that left no code of its own (GCC folded
its result into a constant, or merged its code into the caller's) has no
DW_TAG_inlined_subroutine, while f's abstract instance still says DW_AT_inline (inlined).
Where DWARF says so and no copy is found, the finding is that copies may run unseen
(CodeCopies.inlined_unseen), and the warning says so; the callers that may hold them come
from the build's -fdump-ipa-clones file of f's unit, when one is tied to this binary
(binary/ipaclones.py), and are named.  GCC also says DW_AT_inline of a function it only
cloned: a dump that shows no inlining, or (without a dump) an IPA clone of f, explains it.  docs/patch-authoring.md, "Copies DWARF does not record".
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from elftools.dwarf.die import DIE

from fentry_build.binary.dwarf import (
    CALL_PC_ATTRIBUTES, CALL_SITE_TAGS, CALL_TARGET_ATTRIBUTES, DWARF_ERRORS, ProgramDwarf,
    attribute, die_name, may_be_inlined, origin, text, unit_name, unit_of,
)
from fentry_build.binary.elf import BinaryInfo, FunctionInfo, file_matches
from fentry_build.binary.ipaclones import callers_in_build

CLONE_FIX = "build the program with -flive-patching=inline-only-static so GCC keeps {name} whole"
NOINLINE_FIX = "mark {name} __attribute__((noinline, noclone)) in the program and rebuild it"
UNSEEN_FIX = "replace each function that calls {name} too in this patch (FENTRY_REPLACE each)"
NO_DWARF = "cannot check for inlined copies or the patch's types: {program} has no DWARF; build with -g"
NO_UNIT_DWARF = ("cannot check {name} for inlined copies or its prototype: the program's DWARF does "
                 "not describe it; compile {where} with -g (and without -gsplit-dwarf)")


def _function_name(name: str) -> str:
    """The function a `.cold` part belongs to: main.cold -> main, f.constprop.0.cold -> f.constprop.0."""
    words = name.split(".")
    if "cold" in words[1:]:
        return ".".join(words[: words.index("cold", 1)])
    return name


def _same_file(clone: FunctionInfo, f: FunctionInfo) -> bool:
    """Can `clone` (a local symbol) be a copy of f: same file, or f's file unknown?"""
    return f.file is None or file_matches(clone.file, f.file)


def _join(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class FunctionsByAddress:
    """The binary's functions, looked up by an address inside their code."""

    def __init__(self, functions: Iterable[FunctionInfo]) -> None:
        self._functions = sorted(functions, key=lambda f: f.addr)
        self._starts = [f.addr for f in self._functions]
        self._by_name: dict[tuple[str, str | None], FunctionInfo] = {}
        for f in self._functions:
            self._by_name.setdefault((f.name, f.file), f)

    def containing(self, addr: int) -> FunctionInfo | None:
        """The function whose code holds `addr`, as the function a `.cold` part belongs to."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._functions[i].addr + max(self._functions[i].size, 1):
            return None
        f = self._functions[i]
        base = _function_name(f.name)
        return f if base == f.name else self._by_name.get((base, f.file), f)


@dataclass
class CodeCopies:
    """Where copies of one function's code run, besides its own body."""

    function: FunctionInfo
    inlined_into: list[FunctionInfo] = field(default_factory=list)  # callers holding a copy
    clones: list[FunctionInfo] = field(default_factory=list)        # IPA clones with a site
    clone_callers: dict[str, list[FunctionInfo]] = field(default_factory=dict)  # by clone name
    checked: bool = True  # False: f's unit has no DWARF, inlined copies were not looked for
    inlined_unseen: bool = False  # DWARF says f was inlined, yet it records no inlined copy
    # The callers the build's -fdump-ipa-clones says f was inlined into, if DWARF records no
    # copy; None when no dump of f's unit is tied to this binary.
    unseen_callers: list[FunctionInfo] | None = None


# DW_AT_inline values saying GCC inlined the function (DW_INL_inlined,
# DW_INL_declared_inlined); 0 and 2 say it did not.
INLINED = (1, 3)


def says_inlined(die: DIE) -> bool:
    """Does the DWARF of this function say GCC inlined it somewhere (DW_AT_inline)?"""
    return attribute(die, "DW_AT_inline") in INLINED


class CopyFinder:
    """Finds the inlined copies and IPA clones of functions of one binary."""

    def __init__(self, binary: BinaryInfo, dwarf: ProgramDwarf | None) -> None:
        self._binary = binary
        self._dwarf = dwarf
        self._by_address = FunctionsByAddress(binary.functions)
        # The clones with a fentry site (`.cold` parts and aliases have none), by the name of
        # the function they copy: one pass over the symbols, not one per replaced function.
        self._clones: dict[str, list[FunctionInfo]] = {}
        for c in binary.functions:
            name = c.clone
            if name.is_clone and not name.is_alias and not name.is_cold_part and c.site is not None:
                self._clones.setdefault(name.base, []).append(c)

    def clones_of(self, f: FunctionInfo) -> list[FunctionInfo]:
        """f's IPA clones that have a fentry site (`.cold` parts and aliases have none)."""
        return [c for c in self._clones.get(f.name, ()) if _same_file(c, f)]

    def copies(self, f: FunctionInfo) -> CodeCopies:
        found = CodeCopies(f, clones=self.clones_of(f))
        if self._dwarf is None:
            found.checked = False
            return found
        try:
            die = self._dwarf.subprogram_at(f.addr)
            if die is None:
                found.checked = False
                return found
            if found.clones or may_be_inlined(die):  # else there is nothing to look for
                self._scan(found, die)
        except DWARF_ERRORS:
            found.checked = False
        return found

    def _own(self, f: FunctionInfo, caller: FunctionInfo) -> bool:
        """Is `caller` f itself or one of its clones (whose copies are reported as clones)?"""
        return caller.addr == f.addr or (caller.clone.is_clone and caller.clone.base == f.name
                                         and _same_file(caller, f))

    def _holder(self, die: DIE) -> FunctionInfo | None:
        """The function whose code holds `die` (an inlined copy or a call site)."""
        assert self._dwarf is not None
        addr = self._dwarf.code_address(die)
        if addr is None:
            return None  # no code: part of an abstract instance, or optimised away
        return self._by_address.containing(addr)

    def _scan(self, found: CodeCopies, die: DIE) -> None:
        assert self._dwarf is not None
        f, root = found.function, origin(die).offset
        clone_addrs = {c.addr: c for c in found.clones}
        inlined: dict[int, FunctionInfo] = {}
        recorded = False  # a copy with code of its own, wherever it is
        callers: dict[str, dict[int, FunctionInfo]] = {}
        for cu in self._dwarf.units_sharing_code_with(unit_of(die)):
            for d in cu.iter_DIEs():
                if d.tag == "DW_TAG_inlined_subroutine":
                    if origin(d).offset == root and (holder := self._holder(d)) is not None:
                        recorded = True
                        if not self._own(f, holder):
                            inlined.setdefault(holder.addr, holder)
                elif d.tag in CALL_SITE_TAGS and clone_addrs:
                    clone = self._called_clone(d, clone_addrs)
                    if clone is not None and (holder := self._call_site_holder(d)) is not None \
                            and not self._own(f, holder):
                        callers.setdefault(clone.name, {}).setdefault(holder.addr, holder)
        found.inlined_into = sorted(inlined.values(), key=lambda g: g.name)
        found.clone_callers = {name: sorted(c.values(), key=lambda g: g.name)
                               for name, c in callers.items()}
        if recorded or not says_inlined(die):
            return
        # DWARF says inlined, yet records no copy.  The build's dump, when one is tied to this
        # binary, says where (or that GCC inlined f nowhere: DW_AT_inline came with a clone);
        # without one, a clone of f explains DW_AT_inline too, and its warning is given.
        found.unseen_callers = self._dump_callers(f, die)
        found.inlined_unseen = bool(found.unseen_callers) or \
            (found.unseen_callers is None and not found.clones)

    def _dump_callers(self, f: FunctionInfo, die: DIE) -> list[FunctionInfo] | None:
        """The functions of the binary the build's -fdump-ipa-clones says f was inlined into."""
        assert self._dwarf is not None
        name, decl_file = die_name(die), self._dwarf.decl_file(die)
        line, column = attribute(die, "DW_AT_decl_line"), attribute(die, "DW_AT_decl_column")
        top = unit_of(die).get_top_DIE().attributes
        comp_dir = text(top["DW_AT_comp_dir"].value) if "DW_AT_comp_dir" in top else None
        source = unit_name(unit_of(die))
        if name is None or decl_file is None or not isinstance(line, int) \
                or not isinstance(column, int) or comp_dir is None or source is None:
            return None
        names = callers_in_build(name, decl_file, line, column, comp_dir, source, self._binary.path)
        if names is None:
            return None
        wanted = set(names)
        return sorted((g for g in self._binary.functions
                       if g.name in wanted and (not g.local or _same_file(g, f))
                       and not g.clone.is_cold_part and not self._own(f, g)),
                      key=lambda g: g.name)

    def _called_clone(self, site: DIE, clone_addrs: dict[int, FunctionInfo]) -> FunctionInfo | None:
        assert self._dwarf is not None
        attr = next((a for a in CALL_TARGET_ATTRIBUTES if a in site.attributes), None)
        if attr is None:
            return None
        target = site.get_DIE_from_attribute(attr)
        addr = self._dwarf.code_address(target)
        return clone_addrs.get(addr) if addr is not None else None

    def _call_site_holder(self, site: DIE) -> FunctionInfo | None:
        attr = next((a for a in CALL_PC_ATTRIBUTES if a in site.attributes), None)
        if attr is not None:
            return self._by_address.containing(int(site.attributes[attr].value))
        parent = site.get_parent()
        while parent is not None and parent.tag != "DW_TAG_subprogram":
            parent = parent.get_parent()
        return self._holder(parent) if parent is not None else None

    def inlined_only(self, name: str, file: str | None) -> list[FunctionInfo]:
        """The functions holding inlined copies of a function `name` that has no symbol at all
        (GCC inlined every call); `file` limits it to that source file (file_matches)."""
        if self._dwarf is None:
            return []
        holders: dict[int, FunctionInfo] = {}
        try:
            for cu in self._dwarf.units():
                if file is not None and not file_matches(unit_name(cu), file):
                    continue
                for d in cu.iter_DIEs():
                    if d.tag == "DW_TAG_inlined_subroutine" and die_name(d) == name \
                            and (holder := self._holder(d)) is not None:
                        holders.setdefault(holder.addr, holder)
        except DWARF_ERRORS:
            return []
        return sorted(holders.values(), key=lambda g: g.name)


def _names(functions: Sequence[FunctionInfo]) -> str:
    return _join(f.name for f in functions)


def describe(copies: CodeCopies, replaced: set[int], program: str, has_dwarf: bool) -> str | None:
    """One sentence on what patching copies.function misses and the fix, or None if nothing.

    `replaced` holds the addresses of every function the patch replaces: a caller the patch
    replaces too carries no old copy any more.
    """
    f = copies.function
    inlined = [g for g in copies.inlined_into if g.addr not in replaced]
    missed_clones = []
    for clone in copies.clones:
        known = copies.clone_callers.get(clone.name)
        if known and all(g.addr in replaced for g in known):
            continue  # every known caller of the clone is replaced: nothing runs the clone
        missed_clones.append(clone)
    problems = []
    callers: dict[int, FunctionInfo] = {g.addr: g for g in inlined}
    if inlined:
        problems.append(f"GCC inlined copies of it into {_names(inlined)}, which keep running "
                        "the old code")
    unseen = None if copies.unseen_callers is None else \
        [g for g in copies.unseen_callers if g.addr not in replaced]
    if copies.inlined_unseen and unseen:
        problems.append("its DWARF says GCC inlined it, yet records no inlined copy; the build's "
                        f"-fdump-ipa-clones says it was inlined into {_names(unseen)}, which may "
                        "keep running the old code (a copy GCC folded into its caller)")
        callers.update((g.addr, g) for g in unseen)
    elif copies.inlined_unseen and not (copies.unseen_callers and unseen == []):
        # (every caller the dump names is replaced too: nothing is left running the old copy)
        problems.append("its DWARF says GCC inlined it, yet records no inlined copy: a copy whose "
                        "code GCC folded into its caller (a result computed at build time) "
                        "keeps running the old code unseen")
    if missed_clones:
        described = []
        for clone in missed_clones:
            called_from = [g for g in copies.clone_callers.get(clone.name, []) if g.addr not in replaced]
            callers.update((g.addr, g) for g in called_from)
            described.append(clone.name + (f" (called from {_names(called_from)})" if called_from else ""))
        problems.append(f"GCC also made the IPA clone(s) {_join(described)}, which callers call "
                        "instead and which keep running the old code")
    fixes = []
    if callers:
        fixes.append(f"replace {_names(sorted(callers.values(), key=lambda g: g.name))} too in "
                     "this patch (FENTRY_REPLACE each)")
    elif copies.inlined_unseen:
        fixes.append(UNSEEN_FIX.format(name=f.name))
    fixes.append(NOINLINE_FIX.format(name=f.name))
    if missed_clones or not f.local:  # the flag keeps global functions whole, not static ones
        fixes.append(CLONE_FIX.format(name=f.name))
    if not copies.checked and has_dwarf:
        where = f.file or "its source file"
        unchecked = NO_UNIT_DWARF.format(name=f.name, where=where)
    else:
        unchecked = ""
    if not problems:
        return unchecked or None
    verb = "does not" if inlined or missed_clones else "may not"  # unseen copies: DWARF's word only
    message = f"patching {f.name} {verb} reach all of its code: {'; '.join(problems)}; " \
              f"fix: {'; or '.join(fixes)}"
    return message + (f" ({unchecked})" if unchecked else "")


def no_dwarf_note(program: str) -> str:
    return NO_DWARF.format(program=program)


__all__ = ["CodeCopies", "CopyFinder", "describe", "no_dwarf_note"]
