"""plan.py - what the patch does with each function and variable the fix touches or uses.

From the object comparison (objdiff), the fixed sources (extract) and the running binary
(fentry_build's elfinfo and inline analysis) it decides:

- the functions the patch replaces (FENTRY_REPLACE): every function whose code changed,
  and every function of the binary holding an inlined copy or calling an IPA clone of
  one, to a fixed point;
- the functions it carries as its own code: new functions, and functions the binary has
  no body of (inlined everywhere, or only IPA clones) that the patch's code calls;
- the program's functions and variables it references (FENTRY_REF): never a copy of
  program state;
- the types, macros and new variables it copies from the fixed .c files;
- and what it refuses (refusals.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fentry_build.binary.elf import BinaryInfo, CloneName, DataSymbol, FunctionInfo, file_matches
from fentry_build.generator.inline import CodeCopies, CopyFinder

from fentry_build.generator.fromdiff import refusals
from fentry_build.generator.fromdiff.extract import (
    FunctionSource, Needs, Piece, Symbol, UnitSource, names_in, top_level_variables, type_layouts,
)
from fentry_build.generator.fromdiff.objdiff import UnitDiff

SUFFIX = "_fixed"


@dataclass
class Unit:
    """One translation unit of the program that the fix changes."""

    index: int
    source: Path              # relative to the project folder
    diff: UnitDiff
    fixed: UnitSource
    original: UnitSource

    @property
    def file_name(self) -> str:
        return self.source.name


@dataclass(frozen=True)
class Reference:
    """A FENTRY_REF of the patch."""

    name: str
    type: str
    file: str | None          # the third argument, for a static


@dataclass
class Emitted:
    """A function whose fixed source the patch carries."""

    unit: Unit
    function: FunctionSource
    replaces: FunctionInfo | None   # the program's function it replaces; None: the patch's own
    name: str                       # its name in the patch
    reason: str = ""                # why the patch carries it, for the header comment


@dataclass
class PatchPlan:
    units: list[Unit]
    functions: list[Emitted] = field(default_factory=list)
    refs: dict[str, Reference] = field(default_factory=dict)
    pieces: list[tuple[Unit, Piece]] = field(default_factory=list)  # types, macros, variables
    overrides: dict[str, str] = field(default_factory=dict)         # header macros redefined
    removed_locals: dict[tuple[int, str], list[tuple[int, int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def emitted(self, unit: Unit, name: str) -> Emitted | None:
        return next((e for e in self.functions if e.unit is unit and e.function.name == name), None)

    def replaced(self) -> list[Emitted]:
        return [e for e in self.functions if e.replaces is not None]


class Planner:
    """Decides the patch for `units` of `binary`; raises a Refusal for what cannot be patched."""

    def __init__(self, binary: BinaryInfo, finder: CopyFinder, units: Sequence[Unit],
                 header_changes: Sequence[Path]) -> None:
        self.binary = binary
        self.finder = finder
        self.units = list(units)
        self.header_changes = list(header_changes)
        self.plan = PatchPlan(self.units)
        self._program = binary.name
        self._pieces: set[tuple[int, int]] = set()
        self._names = {n for u in self.units for n in u.fixed.functions}
        self._local_refs: set[str] = set()

    # ---- entry -----------------------------------------------------------------------------

    def run(self) -> PatchPlan:
        changed = self._changed_functions()
        self._check_types(changed)
        self._check_variables()
        self._check_signatures(changed)
        self._check_headers(changed)
        self._choose_functions(changed)
        queue = list(self.plan.functions)
        while queue:
            emitted = queue.pop(0)
            queue += self._resolve_needs(emitted.unit, emitted.function.needs, emitted)
        self.plan.functions.sort(key=lambda e: (e.unit.index, e.function.start))
        self.plan.pieces.sort(key=lambda p: (p[0].index, p[1].start))
        self._check_collisions()
        for e in self.plan.replaced():
            if e.function.name == "main":
                self.plan.notes.append(
                    "the patch replaces main, which is running: its code changes only for calls "
                    "that start after the patch is applied (a program calls main once)")
        if not self.plan.replaced():
            raise refusals.unsupported(
                "the fix changes no function's code in the running build",
                "check that the diff is the fix and --binary the build it is for")
        return self.plan

    def _check_collisions(self) -> None:
        """The patch is one file: what it copies from two units must not share a name."""
        seen: dict[tuple[str, str], tuple[Unit, str]] = {}
        items = [(("function", e.name), e.unit, e.function.name) for e in self.plan.functions]
        items += [((p.kind, p.name), u, p.text) for u, p in self.plan.pieces]
        for key, unit, text in items:
            earlier = seen.setdefault(key, (unit, text))
            if earlier[0] is not unit and (key[0] == "function" or earlier[1] != text):
                raise refusals.unsupported(
                    f"the patch must carry {key[1]} of both {earlier[0].file_name} and "
                    f"{unit.file_name}, and one file cannot hold both",
                    "split the fix into one patch per file (a diff each)")

    # ---- what changed ----------------------------------------------------------------------

    def _changed_functions(self) -> dict[int, set[str]]:
        changed: dict[int, set[str]] = {}
        for u in self.units:
            names = set(u.diff.changed_functions)
            for name, d in u.diff.changed_variables.items():
                if d.readonly and d.local:
                    names |= self._users_of(u, name)  # they must read the patch's new copy
            changed[u.index] = {n for n in names if n in u.fixed.functions}
        return changed

    def _check_variables(self) -> None:
        for u in self.units:
            for name, d in u.diff.new_variables.items():
                if not d.local:
                    raise refusals.new_global(name, u.file_name)
            for name, d in u.diff.changed_variables.items():
                if not d.readonly or not d.local:
                    raise refusals.changed_initializer(name, u.file_name)

    @staticmethod
    def _users_of(unit: Unit, variable: str) -> set[str]:
        users = set()
        for (kind, _), d in unit.diff.fixed.items():
            if kind == "function" and any(k[2][:2] == ("symbol", variable) for k in d.relocs):
                users.add(d.base)
        return users

    def _check_types(self, changed: dict[int, set[str]]) -> None:
        for u in self.units:
            before, after = type_layouts(u.original), type_layouts(u.fixed)
            for name, (_, layout, _) in after.items():
                old = before.get(name)
                if old is None or old[1] == layout:
                    continue
                users = self._type_users(name, changed)
                if users:
                    kind_name, _, bare = name.partition(" ")
                    raise refusals.changed_type(kind_name, bare, f"was: {old[1]}; now: {layout}", users)

    def _type_users(self, type_name: str, changed: dict[int, set[str]]) -> list[str]:
        users: list[str] = []
        for u in self.units:
            for name, f in u.fixed.functions.items():
                if name not in changed.get(u.index, set()) and type_name in names_in(f.cursor):
                    users.append(f"{name} in {u.file_name}")
            for var in top_level_variables(u.fixed):
                if type_name in names_in(var):
                    users.append(f"the variable {var.spelling} in {u.file_name}")
        return sorted(set(users))

    def _check_signatures(self, changed: dict[int, set[str]]) -> None:
        for u in self.units:
            for name in sorted(changed[u.index]):
                old = u.original.functions.get(name)
                new = u.fixed.functions[name]
                if old is not None and old.type != new.type:
                    raise refusals.changed_signature(name, old.type, new.type)

    def _check_headers(self, changed: dict[int, set[str]]) -> None:
        if not self.header_changes:
            return
        reached = {u.file_name: sorted(changed[u.index]) for u in self.units if changed[u.index]}
        if len(reached) > 1 and not any(u.diff.any and self._source_changed(u) for u in self.units):
            raise refusals.header_only([str(h) for h in self.header_changes], reached)

    def _source_changed(self, unit: Unit) -> bool:
        return unit.fixed.data != unit.original.data

    # ---- the functions the patch carries ---------------------------------------------------

    def program_function(self, name: str, unit: Unit, static: bool) -> FunctionInfo | None:
        found = [f for f in self.binary.functions if f.name == name and f.local == static
                 and (not static or file_matches(f.file, unit.file_name))]
        return found[0] if found else None

    def _clones(self, name: str, unit: Unit) -> list[FunctionInfo]:
        return [f for f in self.binary.functions if f.clone.is_clone and f.clone.base == name
                and not f.clone.is_alias and not f.clone.is_cold_part
                and (not f.local or file_matches(f.file, unit.file_name))]

    def _unit_of(self, f: FunctionInfo) -> tuple[Unit, str] | None:
        base = CloneName.parse(f.name).base
        for u in self.units:
            fs = u.fixed.functions.get(base)
            if fs is not None and (not f.local or file_matches(f.file, u.file_name)):
                return u, base
        return None

    @staticmethod
    def _holders(copies: CodeCopies, name: str) -> list[tuple[FunctionInfo, str]]:
        """The functions running code of `name` without reaching its entry, and how."""
        found = [(f, f"it holds an inlined copy of {name}") for f in copies.inlined_into]
        for clone, callers in copies.clone_callers.items():
            found += [(f, f"it calls {clone}, an IPA clone of {name}") for f in callers]
        return found

    def _choose_functions(self, changed: dict[int, set[str]]) -> None:
        queue = [(u, n, "its code changed") for u in self.units for n in sorted(changed[u.index])]
        seen: set[tuple[int, str]] = set()
        while queue:
            unit, name, reason = queue.pop(0)
            if (unit.index, name) in seen:
                continue
            seen.add((unit.index, name))
            fs = unit.fixed.functions[name]
            target = self.program_function(name, unit, fs.static)
            if target is not None:
                if target.site is None:
                    raise refusals.no_fentry_site(name, unit.file_name, self._program)
                self._emit(unit, fs, target, reason)
                holders = self._holders(self.finder.copies(target), name)
            else:
                why = "new" if name in unit.diff.new_functions else \
                    f"{reason}; {self._program} has no body of its own for it"
                self._emit(unit, fs, None, why)
                holders = self._copies_without_body(name, unit)
            for h, how in holders:
                where = self._unit_of(h)
                if where is None:
                    raise refusals.unsupported(
                        f"{h.name} ({h.file or 'unknown file'}) holds a copy of {name}, which the "
                        "fix changes, but its source is not among the recompiled units",
                        "rebuild without LTO, or replace it by hand")
                queue.append((*where, how))

    def _copies_without_body(self, name: str, unit: Unit) -> list[tuple[FunctionInfo, str]]:
        """Where the code of `name` runs when the binary has no body of its own for it."""
        clones = self._clones(name, unit)
        if clones:
            c = clones[0]  # stands in for the function: its clones and inlined copies are found
            standin = FunctionInfo(name, c.addr, c.size, c.local, c.file, c.site)
            return self._holders(self.finder.copies(standin), name)
        return [(f, f"it holds an inlined copy of {name}")
                for f in self.finder.inlined_only(name, unit.file_name)]

    def _emit(self, unit: Unit, fs: FunctionSource, target: FunctionInfo | None,
              reason: str) -> Emitted:
        existing = self.plan.emitted(unit, fs.name)
        if existing is not None:
            return existing
        name = fs.name
        if target is not None:
            name = fs.name + SUFFIX
            n = 2
            while name in self._names:
                name, n = f"{fs.name}{SUFFIX}{n}", n + 1
            self._names.add(name)
        emitted = Emitted(unit, fs, target, name, reason)
        self.plan.functions.append(emitted)
        return emitted

    # ---- what the carried code uses ----------------------------------------------------------

    def _resolve_needs(self, unit: Unit, needs: Needs, owner: Emitted | None) -> list[Emitted]:
        added: list[Emitted] = []
        for use in needs.uses:
            new = self._resolve(unit, use.symbol)
            if new is not None:
                added.append(new)
            emitted = self._emitted_function(unit, use.symbol) if use.symbol.kind == "function" else None
            if emitted is not None and emitted.replaces is not None and (not use.call or not use.in_text):
                self._reference(unit, use.symbol)  # its address: the program's entry, patched
        for symbol, start, end in needs.static_locals:
            if owner is not None and self._local_is_programs(unit, symbol):
                self._reference(unit, symbol)
                key = (unit.index, owner.function.name)
                self.plan.removed_locals.setdefault(key, []).append((start, end))
        for decl in needs.types.values():
            self._copy_type(unit, decl)
        for name in needs.macros:
            self._copy_macro(unit, name)
        return added

    def resolution(self, unit: Unit, symbol: Symbol) -> str:
        """How the patch spells a use of `symbol`: "keep", "ref" (FENTRY_VAR), "replace"."""
        if symbol.system:
            return "keep"
        if symbol.kind == "function":
            emitted = self._emitted_function(unit, symbol)
            if emitted is not None:
                return "replace" if emitted.replaces is not None else "keep"
            return "ref" if symbol.key in self.plan.refs else "keep"
        if symbol.kind == "static local":
            return "ref" if symbol.key in self._local_refs else "keep"
        return "ref" if symbol.name in self.plan.refs else "keep"

    def _emitted_function(self, unit: Unit, symbol: Symbol) -> Emitted | None:
        if symbol.static:
            return self.plan.emitted(unit, symbol.name)
        return next((e for e in self.plan.functions
                     if e.function.name == symbol.name and not e.function.static), None)

    def _resolve(self, unit: Unit, symbol: Symbol) -> Emitted | None:
        if symbol.system:
            return None
        if symbol.kind == "function":
            return self._resolve_function(unit, symbol)
        if symbol.kind == "variable":
            self._resolve_variable(unit, symbol)
        return None

    def _resolve_function(self, unit: Unit, symbol: Symbol) -> Emitted | None:
        if self._emitted_function(unit, symbol) is not None:
            return None
        target = self.program_function(symbol.name, unit, symbol.static)
        if target is not None:
            self._reference(unit, symbol)
            return None
        fs = unit.fixed.functions.get(symbol.name)
        if fs is None:
            if not symbol.static and not any(symbol.name in u.fixed.functions for u in self.units):
                return None  # defined outside the program (a library): called directly
            owner = next((u for u in self.units if symbol.name in u.fixed.functions), None)
            if owner is None or owner is unit:
                return None  # a static inline of a header: the include brings it
            return self._emit(owner, owner.fixed.functions[symbol.name], None, self._no_body(symbol))
        # The binary has no body of it (inlined everywhere, only IPA clones, or new): the
        # patch carries its own copy.
        return self._emit(unit, fs, None, self._no_body(symbol))

    def _no_body(self, symbol: Symbol) -> str:
        return f"the patch calls it and {self._program} has no body of its own for it (inlined or cloned)"

    def _resolve_variable(self, unit: Unit, symbol: Symbol) -> None:
        if symbol.name in self.plan.refs:
            return
        new_or_changed = symbol.name in unit.diff.new_variables or symbol.name in unit.diff.changed_variables
        if not new_or_changed and self._program_variable(symbol.name, unit, symbol.static) is not None:
            self._reference(unit, symbol)
            return
        cursor = unit.fixed.variable(symbol.name)
        if cursor is None or not unit.fixed.in_main(cursor):
            return  # declared by a header, defined elsewhere (a library): used directly
        piece = unit.fixed.declaration_of(cursor)
        if piece is not None:
            self._add_piece(unit, piece)
            needs = unit.fixed.type_needs(cursor)
            for use in needs.uses:
                if use.symbol.kind == "function" and not use.symbol.system:
                    raise refusals.unsupported(
                        f"the patch must carry its own {symbol.name} ({unit.file_name}), whose "
                        f"initializer names the function {use.symbol.name}",
                        "a patch cannot initialise data with the program's functions; set it "
                        "in a FENTRY_POST_PATCH callback")
            self._resolve_needs(unit, needs, None)
            if symbol.name in unit.diff.new_variables:
                self.plan.notes.append(
                    f"{symbol.name} is new in {unit.file_name}: the patch has its own, "
                    "initialised when the patch loads and gone when it is unloaded")

    def _program_variable(self, name: str, unit: Unit, static: bool) -> DataSymbol | None:
        found = [v for v in self.binary.variables if v.name == name and v.local == static
                 and (not static or file_matches(v.file, unit.file_name))]
        return found[0] if found else None

    def _local_is_programs(self, unit: Unit, symbol: Symbol) -> bool:
        """Is `symbol` (a static local) the program's state: writable, and in the binary?"""
        if symbol.const:
            return False
        base, _, _ = symbol.name.partition(".")
        found = [v for v in self.binary.variables if v.local and file_matches(v.file, unit.file_name)
                 and v.name.partition(".")[0] == base and v.name.partition(".")[2].isdigit()]
        if not found:
            return False
        self._local_refs.add(symbol.key)
        return True

    def _reference(self, unit: Unit, symbol: Symbol) -> None:
        key = symbol.key if symbol.kind == "function" else symbol.name
        existing = self.plan.refs.get(key)
        file = unit.file_name if symbol.static else None
        if existing is not None:
            if existing.file != file:
                raise refusals.unsupported(
                    f"the patch uses two program symbols named {symbol.name} "
                    f"({existing.file or 'global'} and {file or 'global'})",
                    "one FENTRY_REF per name: rename one of them in the program, or split the fix")
            return
        if "(unnamed" in symbol.type or "(anonymous" in symbol.type:
            raise refusals.unsupported(
                f"the patch must reference {symbol.name} ({unit.file_name}), whose type has no "
                "name to spell in FENTRY_REF", f"give the type of {symbol.name} a name (a typedef)")
        self.plan.refs[key] = Reference(symbol.name, symbol.type, file)
        cursor = unit.fixed.cursor_of(symbol) if symbol.kind != "static local" else None
        if cursor is not None:
            for decl in unit.fixed.declaration_needs(cursor).types.values():
                self._copy_type(unit, decl)

    # ---- copied declarations -----------------------------------------------------------------

    def _add_piece(self, unit: Unit, piece: Piece) -> bool:
        key = (unit.index, piece.start)
        if key in self._pieces:
            return False
        self._pieces.add(key)
        self.plan.pieces.append((unit, piece))
        return True

    def _copy_type(self, unit: Unit, decl: object) -> None:
        path, system = unit.fixed.type_file(decl)
        if system or path is None or path != unit.fixed.path:
            return  # a header's type: the include brings it
        piece = unit.fixed.declaration_of(decl)
        if piece is not None and self._add_piece(unit, piece):
            self._resolve_needs(unit, unit.fixed.type_needs(decl), None)

    def _copy_macro(self, unit: Unit, name: str) -> None:
        definition = unit.fixed.macro_definition(name)
        if definition is None or definition.location.file is None:
            return
        if str(definition.location.file.name) != str(unit.fixed.path):
            return  # a header's macro: the include brings it
        text = unit.fixed.macro_text(definition)
        start = int(definition.extent.start.offset)
        piece = Piece("macro", name, start, int(definition.extent.end.offset), "#define " + text)
        if self._add_piece(unit, piece):
            for token in unit.fixed.macro_tokens(definition)[1:]:
                if token != name and unit.fixed.macro_definition(token) is not None:
                    self._copy_macro(unit, token)


def changed_headers(relative: Iterable[Path]) -> list[Path]:
    return [p for p in relative if p.suffix != ".c"]
