"""generator/protocheck.py - the compiler checks the patch's types against the program's, when the patch is built.

A replacement with another prototype than the function it replaces builds without a word
and crashes the process it is applied to; so does a FENTRY_ORIGINAL or FENTRY_REF of the
wrong type.  The generator writes the program's types, read from its DWARF (typedefs
resolved: cdecl.CanonicalTypeWriter), into a header of FENTRY_CHECK_TYPE_<use> macros and
compiles the patch once more with it and -DFENTRY_GEN_CHECK: fentry.h's macros then
expand to _Static_assert(__builtin_types_compatible_p(<the patch's type>, <the program's>)),
so the compiler, not the generator, decides.  A failed assertion is a one-line error naming
both types and the fix; FENTRY_REPLACE_UNCHECKED opts out for a deliberate ABI-compatible
difference; a type that cannot be checked (no DWARF, a type the patch cannot name) is a
warning (strict: an error).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile

from fentry_build.binary.dwarf import DWARF_ERRORS, ProgramDwarf, die_name
from fentry_build.binary.program import Program
from fentry_build.errors import FentryError
from fentry_build.generator.cdecl import CanonicalTypeWriter, CTypeWriter, function_type, type_of
from fentry_build.generator.patchsrc import UNCHECKED_MACRO, PatchSource
from fentry_build.generator.resolve import ResolvedRef, ResolvedReplacement
from fentry_build.generator.scan import PatchCompile

CHECK_FLAGS = ["-DFENTRY_GEN_CHECK", "-fsyntax-only", "-w"]
FAILED = re.compile(r'static assertion failed: "fentry-check (replace|original|ref) (\w+)"')

Warn = Callable[[str], None]


@dataclass
class Check:
    """One type the compiler compares: the patch's (at `line`) with the program's."""

    kind: str           # "replace" (key: the replacement), "original" (the old function), "ref"
    key: str
    line: int
    where: str          # "patch.c:12: " for messages
    expected: str | None   # the program's type for the compiler (typedefs resolved); None: skip
    shown: str          # the program's type for people (its own typedef names)
    subject: str        # what is compared, for messages
    why_not: str = ""   # why it is skipped

    def define(self) -> list[str]:
        name = f"{self.kind.upper()}__{self.key}"
        skip = self.expected is None
        return [f"#define FENTRY_CHECK_SKIP_{name} {int(skip)}",
                f"#define FENTRY_CHECK_TYPE_{name} {'void' if skip else self.expected}"]


def _types(die: DIE, *, function: bool, pointer: bool = False,
           name: str = "") -> tuple[str | None, str]:
    """(the type for the compiler, or None when it cannot be written; for people: the type,
    or with `name` the declaration `int name(const char *)`)."""
    canonical, human = CanonicalTypeWriter(), CTypeWriter()
    if function:
        expected = function_type(die, canonical, pointer=pointer)
        shown = declaration(die, human, name) if name else function_type(die, human, pointer=pointer)
    else:
        expected, shown = canonical.declare(type_of(die)), human.declare(type_of(die))
    return (None if canonical.unspellable else expected), shown


def declaration(die: DIE, writer: CTypeWriter, name: str) -> str:
    """`int name(const char *, size_t)`: the function of `die` declared under `name`."""
    return writer.declare(type_of(die), f"{name}({writer.parameter_types(die) or 'void'})")


class PrototypeCheck:
    """The checks of one patch against one program, and the compile that makes them."""

    def __init__(self, program: Program, source: PatchSource, compile: PatchCompile) -> None:
        self._program = program
        self._source = source
        self._compile = compile
        self.checks: list[Check] = []

    def _where(self, line: int) -> str:
        return f"{self._source.path}:{line}: "

    def plan(self, resolved: Sequence[ResolvedReplacement], refs: Sequence[ResolvedRef],
             dwarf: ProgramDwarf) -> None:
        name = self._program.name
        first: dict[str, tuple[DIE | None, str]] = {}  # FENTRY_ORIGINAL(old) is the first's
        for r in resolved:
            rep, f = r.replacement, r.function
            die = dwarf.subprogram_at(f.addr)
            first.setdefault(rep.old, (die, ""))
            if not rep.checked or die is None:
                continue  # no DWARF of f: the inline check says so once (inline.NO_UNIT_DWARF)
            expected, shown = _types(die, function=True, pointer=True, name=rep.old)
            self.checks.append(Check("replace", rep.new, rep.line, self._where(rep.line),
                                     expected, shown, rep.old))
        originals = {}  # one FENTRY_CHECK_*_ORIGINAL__<old> per name: every use is checked
        for use in self._source.originals:
            if use.macro == "FENTRY_ORIGINAL" and use.old not in originals \
                    and (die := first.get(use.old, (None, ""))[0]) is not None:
                expected, shown = _types(die, function=True, pointer=True)
                originals[use.old] = Check("original", use.old, use.line, self._where(use.line),
                                           expected, shown, f"FENTRY_ORIGINAL({use.old}, {use.type})")
        self.checks += originals.values()
        for ref in refs:
            sym = ref.symbol
            die = dwarf.subprogram_at(sym.addr) if sym.kind == "function" else \
                dwarf.variable_at(sym.addr)
            expected, shown = _types(die, function=sym.kind == "function") if die is not None \
                else (None, "")
            self.checks.append(Check("ref", ref.ref.name, ref.ref.line, self._where(ref.ref.line),
                                     expected, shown, ref.ref.spelled(),
                                     "" if die is not None else f"the DWARF of {name} does not "
                                     f"describe {sym.name}"))

    def run(self, work: Path, scan_object: Path, warn: Warn, strict: bool) -> None:
        """Compile the checks; FentryError for the first type that differs."""
        for c in self.checks:
            if c.expected is None:
                self._unchecked(c, c.why_not or "the program's type cannot be written in C", warn, strict)
        if not any(c.expected is not None for c in self.checks):
            return
        header = work / "fentry_check.h"
        header.write_text("/* written by the generator: the program's types, from its DWARF */\n"
                          + "".join(line + "\n" for c in self.checks for line in c.define()))
        code, found, _ = self._compile.run([*CHECK_FLAGS, "-include", str(header)])
        failed: list[Check] = []
        for d in found:
            if d.kind != "error":
                continue
            m = FAILED.search(d.message)
            check = next((c for c in self.checks if m and (c.kind, c.key) == (m.group(1), m.group(2))),
                         None)
            if check is not None:
                failed.append(check)
            else:  # the program's type, written out, means nothing to the patch
                at = next((c for c in self.checks if c.line == d.line and c.expected), None)
                if at is not None:
                    at.expected = None
                    self._unchecked(at, f"the compiler says {d.message!r}", warn, strict)
        if failed:
            raise self._mismatch(failed[0], scan_object)

    def _unchecked(self, c: Check, why: str, warn: Warn, strict: bool) -> None:
        subject = f"the replacement {c.key} of {c.subject}" if c.kind == "replace" else c.subject
        message = f"{c.where}cannot check the type of {subject} against the program's: {why}"
        if strict:
            raise FentryError(f"{message} (an error because of --strict / FENTRY_STRICT=1)")
        warn(message)

    def _mismatch(self, c: Check, scan_object: Path) -> FentryError:
        name = self._program.name
        if c.kind == "replace":
            old = c.subject
            mine = _replacement_prototype(scan_object, c.key) or f"{c.key} of another prototype"
            return FentryError(
                f"{c.where}the replacement {mine} does not have the prototype of {c.shown} in "
                f"{name}: calls of {old} would pass it the wrong arguments; give {c.key} the "
                f"prototype of {old}, or write {UNCHECKED_MACRO}({old}, {c.key}) if the "
                "difference is deliberate and ABI-compatible")
        if c.kind == "original":
            return FentryError(
                f"{c.where}{c.subject}: {c.key} in {name} is {c.shown}; give FENTRY_ORIGINAL "
                f"that type")
        return FentryError(
            f"{c.where}{c.subject}: {c.key} in {name} is {c.shown}; give FENTRY_REF that type")


def _replacement_prototype(scan_object: Path, function: str) -> str | None:
    """The prototype of the patch's `function`, from the DWARF of its scan object."""
    try:
        with open(scan_object, "rb") as stream:
            dwarf = ProgramDwarf.of(ELFFile(stream))
            if dwarf is None:
                return None
            for cu in dwarf.units():
                for die in cu.get_top_DIE().iter_children():
                    if die.tag == "DW_TAG_subprogram" and die_name(die) == function:
                        return declaration(die, CTypeWriter(), function)
    except (OSError, *DWARF_ERRORS):
        return None
    return None


__all__ = ["Check", "PrototypeCheck"]
