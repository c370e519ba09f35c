"""generator/resolve.py - what a patch's FENTRY_REPLACE and FENTRY_REF name in the built program.

FunctionIndex.lookup() is the package's one function lookup ("the function NAME of FILE"),
used by the generator and by new-patch; the resolvers here turn its failures and the
program's other symbols into the generator's one-line errors, each naming the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fentry_build.binary.dwarf import DWARF_ERRORS, ProgramDwarf
from fentry_build.binary.elf import BinaryInfo, DataSymbol, FunctionInfo, file_matches
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CLONE_FIX, NOINLINE_FIX, CopyFinder
from fentry_build.generator.patchsrc import PatchSource, Reference, Replacement

INSTRUMENT_FIX = "compile its source{where} with dependency('fentry') / -pg -mfentry"

Warn = Callable[[str], None]


@dataclass(frozen=True)
class ResolvedReplacement:
    """A FENTRY_REPLACE of the patch and the program's function it replaces."""

    replacement: Replacement
    function: FunctionInfo
    orig_symbol: str  # the name after fentry_orig__ (old, or old__2... for repeats)


class FunctionIndex:
    """The binary's functions by name, with the IPA clones of each by the name they copy.

    lookup() is the one way the package finds "the function NAME (of FILE)" of a built
    program: FENTRY_REPLACE in the generator and --function in new-patch both use it, and
    phrase its failures (the LookupFailure subclasses) for their own users.
    """

    def __init__(self, binary: BinaryInfo) -> None:
        self.binary = binary
        self._by_name: dict[str, list[FunctionInfo]] = {}
        self._any_by_name: dict[str, list[FunctionInfo]] = {}
        self._clones: dict[str, list[FunctionInfo]] = {}
        for f in binary.functions:
            clone = f.clone
            self._add_unique(self._any_by_name.setdefault(f.name, []), f)
            if not clone.is_clone:
                self._add_unique(self._by_name.setdefault(f.name, []), f)
            elif not clone.is_alias and not clone.is_cold_part:
                self._clones.setdefault(clone.base, []).append(f)

    @staticmethod
    def _add_unique(group: list[FunctionInfo], f: FunctionInfo) -> None:
        if all(g.addr != f.addr for g in group):  # a symbol seen twice is one function
            group.append(f)

    def named(self, name: str, *, any_symbol: bool = False) -> list[FunctionInfo]:
        """The functions called `name`: not clones, unless `any_symbol` (then the symbol's name)."""
        return list((self._any_by_name if any_symbol else self._by_name).get(name, []))

    def clones_of(self, name: str) -> list[FunctionInfo]:
        return list(self._clones.get(name, []))

    def close_names(self, name: str, *, clone_bases: bool = True) -> list[str]:
        """Names like `name` that a patch could mean: instrumented functions (not the shim's
        own, nor libc's), and with `clone_bases` the functions GCC only cloned."""
        names = {n for n, fs in self._by_name.items() if any(f.site is not None for f in fs)}
        names |= set(self._clones) if clone_bases else set()
        return difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)

    def lookup(self, name: str, file: str | None = None, *, any_symbol: bool = False) -> FunctionInfo:
        """The one instrumented function `name` (of source file `file`, see file_matches).

        Raises NoSuchFunction, NotInFile, AmbiguousFunction or NotInstrumented, in that order
        of checking.
        """
        candidates = self.named(name, any_symbol=any_symbol)
        if not candidates:
            raise NoSuchFunction(name, self.clones_of(name))
        if file is not None:
            matching = [f for f in candidates if file_matches(f.file, file)]
            if not matching:
                raise NotInFile(name, file, candidates)
            candidates = matching
        if len(candidates) > 1:
            raise AmbiguousFunction(name, candidates)
        if candidates[0].site is None:
            raise NotInstrumented(name, candidates[0])
        return candidates[0]


class LookupFailure(Exception):
    """Why FunctionIndex.lookup() found no single patchable function; its users phrase it."""

    def __init__(self, name: str, candidates: list[FunctionInfo]) -> None:
        super().__init__(name)
        self.name = name
        self.candidates = candidates


class NoSuchFunction(LookupFailure):
    """No function has the name; `candidates` are its IPA clones, if GCC made only those."""


class NotInFile(LookupFailure):
    """Functions have the name, but none in the file asked for."""

    def __init__(self, name: str, file: str, candidates: list[FunctionInfo]) -> None:
        super().__init__(name, candidates)
        self.file = file


class AmbiguousFunction(LookupFailure):
    """Several functions have the name (static functions of several files)."""


class NotInstrumented(LookupFailure):
    """The one function of that name has no call to __fentry__ at its entry."""

    def __init__(self, name: str, function: FunctionInfo) -> None:
        super().__init__(name, [function])
        self.function = function


def _where(f: FunctionInfo) -> str:
    kind = "static" if f.local else "global"
    return f"{kind} in {f.file}" if f.file else f"{kind} in an unknown file"


def _names(functions: list[FunctionInfo]) -> str:
    return ", ".join(f.name for f in functions)


class ReplacementResolver:
    """Finds the function each FENTRY_REPLACE names, or says exactly why it cannot be patched."""

    def __init__(self, index: FunctionIndex, patch: PatchSource, finder: CopyFinder | None = None) -> None:
        self._index = index
        self._patch = patch
        self._finder = finder
        self._program = index.binary.name

    def _error(self, rep: Replacement, message: str) -> FentryError:
        return FentryError(f"{self._patch.path}:{rep.line}: {message}")

    def resolve(self, rep: Replacement) -> FunctionInfo:
        try:
            return self._index.lookup(rep.old, rep.file)
        except NoSuchFunction:
            raise self._missing(rep) from None
        except NotInFile as e:
            found = "; ".join(_where(f) for f in e.candidates)
            raise self._error(
                rep, f"no function {rep.old} of file \"{rep.file}\" in {self._program} "
                f"({rep.old} is {found}); fix the third argument of {rep.spelled()}") from None
        except AmbiguousFunction as e:
            raise self._ambiguous(rep, e.candidates) from None
        except NotInstrumented as e:
            where = f" ({e.function.file})" if e.function.file else ""
            raise self._error(rep, f"{rep.old} in {self._program} is not instrumented (no call to "
                              f"__fentry__ at its entry); {INSTRUMENT_FIX.format(where=where)}") from None

    def _missing(self, rep: Replacement) -> FentryError:
        clones = self._index.clones_of(rep.old)
        if clones:
            return self._error(
                rep, f"{rep.old} has no body of its own in {self._program}: GCC made only the IPA "
                f"clone(s) {_names(clones)}, which its callers call instead (a clone has its own "
                f"signature and cannot be named in FENTRY_REPLACE); {CLONE_FIX.format(name=rep.old)}")
        if not self._index.binary.has_symtab:
            return self._error(
                rep, f"no function {rep.old} among the exported functions of {self._program}, "
                "which has no .symtab (stripped); give the generator the unstripped build")
        holders = self._finder.inlined_only(rep.old, rep.file) if self._finder is not None else []
        if holders:
            return self._error(
                rep, f"{rep.old} has no body of its own in {self._program}: GCC inlined every call "
                f"of it, into {_names(holders)}; replace those functions instead (FENTRY_REPLACE "
                f"each), or {NOINLINE_FIX.format(name=rep.old)}")
        close = self._index.close_names(rep.old)
        if not self._index.binary.has_dwarf:
            return self._error(rep, self._missing_without_dwarf(rep, close))
        if close:
            return self._error(
                rep, f"no function {rep.old} in {self._program}; did you mean {' or '.join(close)}? "
                f"Fix the first argument of {rep.spelled()}")
        return self._error(
            rep, f"no function {rep.old} in {self._program}; fix the first argument of "
            f"{rep.spelled()}, or if {rep.old} is in a shared library, build the patch for that library")

    def _missing_without_dwarf(self, rep: Replacement, close: list[str]) -> str:
        """No symbol, and no DWARF to tell a wrong name from a function GCC inlined everywhere."""
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        return (f"no function {rep.old} in {self._program}: no symbol has that name, and "
                f"{self._program} has no DWARF (-g) to tell whether GCC inlined a static {rep.old} "
                f"into every caller, the usual cause; if it did, replace its callers instead "
                f"(build the program with -g and the generator names them), or "
                f"{NOINLINE_FIX.format(name=rep.old)}; otherwise {guess}fix the first argument of "
                f"{rep.spelled()}")

    def _ambiguous(self, rep: Replacement, candidates: list[FunctionInfo]) -> FentryError:
        found = "; ".join(_where(f) for f in candidates)
        example = next((f.file for f in candidates if f.file), "file.c")
        if rep.file is not None:
            fix = "their files have the same name: rename one of the functions"
        else:
            fix = (f"add the file as the third argument, e.g. "
                   f"FENTRY_REPLACE({rep.old}, {rep.new}, \"{example}\")")
        return self._error(
            rep, f"{rep.old} is ambiguous in {self._program}: {len(candidates)} functions have "
            f"that name ({found}); {fix}")


def _orig_symbols(replacements: Sequence[Replacement]) -> list[str]:
    """fentry_orig__ names: the first replacement of a name keeps it, later ones get __2, __3..."""
    seen: dict[str, int] = {}
    names = []
    for rep in replacements:
        seen[rep.old] = seen.get(rep.old, 0) + 1
        names.append(rep.old if seen[rep.old] == 1 else f"{rep.old}__{seen[rep.old]}")
    return names


def resolve_patch(binary: BinaryInfo, patch: PatchSource, warn: Warn | None = None,
                  finder: CopyFinder | None = None) -> list[ResolvedReplacement]:
    """Every FENTRY_REPLACE of `patch` resolved against `binary`, each function once.

    (`warn` is unused: code the patch misses is reported by code_copy_findings.)
    """
    resolver = ReplacementResolver(FunctionIndex(binary), patch, finder)
    resolved: list[ResolvedReplacement] = []
    by_addr: dict[int, ResolvedReplacement] = {}  # one look-up per replacement, not K²
    for rep, orig in zip(patch.replacements, _orig_symbols(patch.replacements)):
        function = resolver.resolve(rep)
        earlier = by_addr.get(function.addr)
        if earlier is not None:
            raise FentryError(
                f"{patch.path}:{rep.line}: {rep.spelled()} replaces the same function as "
                f"line {earlier.replacement.line}; replace each function once")
        by_addr[function.addr] = ResolvedReplacement(rep, function, orig)
        resolved.append(by_addr[function.addr])
    _check_originals(patch)
    return resolved


def _check_originals(patch: PatchSource) -> None:
    replaced = {rep.old for rep in patch.replacements}
    for use in patch.originals:
        if use.old not in replaced:
            raise FentryError(
                f"{patch.path}:{use.line}: {use.spelled()} but the patch has no "
                f"FENTRY_REPLACE({use.old}, ...); add it, or drop the {use.macro}")


@dataclass(frozen=True)
class ProgramSymbol:
    """A function or variable of the program that a FENTRY_REF may name."""

    name: str  # the .symtab name (a function's static local `count` is `count.0`)
    addr: int
    size: int
    local: bool
    file: str | None
    kind: str  # "function", "variable", "static local variable"
    tls: bool = False

    def where(self) -> str:
        """E.g. "a static variable in a.c", "the static local variable count.0 in a.c"."""
        place = f"in {self.file}" if self.file else "in an unknown file"
        if self.kind == "static local variable":
            return f"the {self.kind} {self.name} {place}"
        return f"a {'static' if self.local else 'global'} {self.kind} {place}"


@dataclass(frozen=True)
class ResolvedRef:
    """A FENTRY_REF of the patch and the program's symbol it names."""

    ref: Reference
    symbol: ProgramSymbol


def _function_symbol(f: FunctionInfo) -> ProgramSymbol:
    return ProgramSymbol(f.name, f.addr, f.size, f.local, f.file, "function")


def _variable_symbol(v: DataSymbol, kind: str = "variable") -> ProgramSymbol:
    return ProgramSymbol(v.name, v.addr, v.size, v.local, v.file, kind, v.tls)


def _is_static_local_of(name: str, symbol: str) -> bool:
    """Is `symbol` how GCC names a function's `static ... name;` (name.0, name.1, ...)?"""
    base, dot, number = symbol.partition(".")
    return base == name and dot == "." and number.isdigit()


class RefResolver:
    """Finds the variable or function each FENTRY_REF names, with FENTRY_REPLACE's matching rules."""

    def __init__(self, binary: BinaryInfo, patch: PatchSource, dwarf: ProgramDwarf | None,
                 finder: CopyFinder) -> None:
        self._binary = binary
        self._patch = patch
        self._dwarf = dwarf
        self._finder = finder
        self._program = binary.name

    def _error(self, ref: Reference, message: str) -> FentryError:
        return FentryError(f"{self._patch.path}:{ref.line}: {message}")

    def resolve(self, ref: Reference) -> ProgramSymbol:
        candidates = self._named(ref.name)
        if not candidates:
            candidates = [_variable_symbol(v, "static local variable") for v in self._binary.variables
                          if v.local and _is_static_local_of(ref.name, v.name)]
        if not candidates:
            raise self._missing(ref)
        if ref.file is not None:
            candidates = self._in_file(ref, candidates)
        if len(candidates) > 1:
            raise self._ambiguous(ref, candidates)
        symbol = candidates[0]
        if symbol.tls:
            raise self._error(
                ref, f"{ref.name} is a thread-local (__thread) variable in {symbol.file or self._program}; "
                "FENTRY_REF does not support thread-local variables (each thread has its own copy at "
                "an address only that thread knows): call a function of the program that uses it "
                "(FENTRY_REF that function), or keep the patch's data in a shadow variable")
        return symbol

    def _named(self, name: str) -> list[ProgramSymbol]:
        found: list[ProgramSymbol] = []
        for s in [*(_function_symbol(f) for f in self._binary.functions if f.name == name),
                  *(_variable_symbol(v) for v in self._binary.variables if v.name == name)]:
            if all((s.addr, s.kind) != (t.addr, t.kind) for t in found):  # one symbol seen twice
                found.append(s)
        return found

    def _missing(self, ref: Reference) -> FentryError:
        gone = self._optimised_away(ref)
        if gone is not None:
            return self._error(ref, gone)
        clones = [f for f in self._binary.functions if f.clone.is_clone and f.clone.base == ref.name
                  and not f.clone.is_cold_part and not f.clone.is_alias]
        if clones:
            return self._error(
                ref, f"{ref.name} has no body of its own in {self._program}: GCC made only the IPA "
                f"clone(s) {_names(clones)}, which take other arguments than {ref.name} and cannot "
                f"be called through {ref.spelled()}; replace the functions that call it instead, "
                f"or {NOINLINE_FIX.format(name=ref.name)}")
        if not self._binary.has_symtab:
            return self._error(
                ref, f"no variable or function {ref.name} among the exported symbols of "
                f"{self._program}, which has no .symtab (stripped); give the generator the "
                "unstripped build")
        close = difflib.get_close_matches(ref.name, self._all_names(), n=3, cutoff=0.6)
        if close:
            return self._error(
                ref, f"no variable or function {ref.name} in {self._program}; did you mean "
                f"{' or '.join(close)}? Fix the first argument of {ref.spelled()}")
        hint = ("" if self._dwarf is not None else
                " (a static variable GCC optimised away has no symbol either: build with -g to tell)")
        return self._error(
            ref, f"no variable or function {ref.name} in {self._program}{hint}; fix the first "
            f"argument of {ref.spelled()}")

    def _optimised_away(self, ref: Reference) -> str | None:
        """Why `ref` has no symbol when DWARF shows it exists: kept in registers, or inlined."""
        if self._dwarf is None:
            return None
        fix = (f"the running program has nothing {ref.spelled()} could bind to; to patch code "
               "that uses it, replace the functions that use it")
        try:
            for die, file in self._dwarf.variables_named(ref.name):
                if ref.file is not None and not file_matches(file, ref.file):
                    continue
                if self._dwarf.variable_address(die) is None:
                    where = f" of {file}" if file else ""
                    return (f"{ref.name} is a variable{where} but has no symbol in {self._program} "
                            f"(optimised away?): GCC kept it in registers or folded it into the "
                            f"code; {fix}")
        except DWARF_ERRORS:  # damaged DWARF only loses the better message
            return None
        holders = self._finder.inlined_only(ref.name, ref.file)
        if holders:
            return (f"{ref.name} is a function but has no symbol in {self._program} (optimised "
                    f"away?): GCC inlined every call of it, into {_names(holders)}; {fix}")
        return None

    def _all_names(self) -> list[str]:
        names = {f.name for f in self._binary.functions if not f.clone.is_clone}
        names |= {v.name.partition(".")[0] for v in self._binary.variables}
        return sorted(names)

    def _file_of(self, symbol: ProgramSymbol) -> str | None:
        """The symbol's source file; for a global variable DWARF's answer, when there is DWARF."""
        if symbol.file is not None or self._dwarf is None or symbol.kind == "function":
            return symbol.file
        try:
            return self._dwarf.file_of_variable_at(symbol.addr)
        except DWARF_ERRORS:  # damaged DWARF: the file stays unknown
            return None

    def _in_file(self, ref: Reference, candidates: list[ProgramSymbol]) -> list[ProgramSymbol]:
        assert ref.file is not None
        candidates = [ProgramSymbol(c.name, c.addr, c.size, c.local, self._file_of(c), c.kind, c.tls)
                      for c in candidates]
        matching = [c for c in candidates if file_matches(c.file, ref.file)]
        if not matching:
            found = "; ".join(c.where() for c in candidates)
            raise self._error(
                ref, f"no variable or function {ref.name} of file \"{ref.file}\" in {self._program} "
                f"({ref.name} is {found}); fix the third argument of {ref.spelled()}")
        return matching

    def _ambiguous(self, ref: Reference, candidates: list[ProgramSymbol]) -> FentryError:
        found = "; ".join(c.where() for c in candidates)
        example = next((c.file for c in candidates if c.file), "file.c")
        files = [c.file for c in candidates]
        if ref.file is not None or len(set(files)) < len(files):
            fix = ("the file cannot tell them apart: rename one in the program, or reach it "
                   "through a function of the program (FENTRY_REF that function)")
        else:
            fix = (f"add the file as the third argument, e.g. "
                   f"FENTRY_REF({ref.name}, {ref.type}, \"{example}\")")
        return self._error(
            ref, f"{ref.name} is ambiguous in {self._program}: {len(candidates)} symbols have "
            f"that name ({found}); {fix}")


def resolve_refs(binary: BinaryInfo, patch: PatchSource, dwarf: ProgramDwarf | None = None,
                 finder: CopyFinder | None = None) -> list[ResolvedRef]:
    """Every FENTRY_REF of `patch` resolved against `binary`."""
    resolver = RefResolver(binary, patch, dwarf, finder or CopyFinder(binary, dwarf))
    return [ResolvedRef(ref, resolver.resolve(ref)) for ref in patch.refs]


__all__ = [
    "AmbiguousFunction", "FunctionIndex", "LookupFailure", "NoSuchFunction", "NotInFile",
    "NotInstrumented", "ProgramSymbol", "RefResolver", "ReplacementResolver", "ResolvedRef",
    "ResolvedReplacement", "resolve_patch", "resolve_refs",
]
