"""generator/patchsrc.py - a patch's FENTRY_* uses, from the records its compile left (generator/scan.py).

The compiler finds the macros (scan.py); this module checks what their arguments are and
turns them into the PatchSource the resolvers read, with one-line errors for each misuse
the compiler lets through (a name that is not an identifier, a function replaced twice,
a callback given twice...).  Arguments arrive as written, stringized by the preprocessor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fentry_build.errors import FentryError
from fentry_build.generator.scan import Record

REPLACE_MACRO = "FENTRY_REPLACE"
UNCHECKED_MACRO = "FENTRY_REPLACE_UNCHECKED"
REF_MACRO = "FENTRY_REF"
VAR_MACRO = "FENTRY_VAR"
REPLACE_ALL_MACRO = "FENTRY_REPLACE_ALL"
# Each callback macro and the field of struct fentry_patch it fills.
CALLBACK_MACROS = {
    "FENTRY_PRE_PATCH": "pre_patch",
    "FENTRY_POST_PATCH": "post_patch",
    "FENTRY_PRE_UNPATCH": "pre_unpatch",
    "FENTRY_POST_UNPATCH": "post_unpatch",
}
# The record kind fentry.h writes for each callback macro.
CALLBACK_KINDS = {field: macro for macro, field in CALLBACK_MACROS.items()}
REPLACE_USAGE = "write FENTRY_REPLACE(old_function, new_function) or FENTRY_REPLACE(old_function, new_function, \"file.c\")"
REF_USAGE = "write FENTRY_REF(name, type) or FENTRY_REF(name, type, \"file.c\"), e.g. FENTRY_REF(requests, long)"
USAGES = {
    REPLACE_MACRO: REPLACE_USAGE,
    REF_MACRO: REF_USAGE,
    REPLACE_ALL_MACRO: "write FENTRY_REPLACE_ALL(); once, at file scope",
    **{m: f"write {m}(function_name); once, at file scope" for m in CALLBACK_MACROS},
}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE = re.compile(r'"([^"\\]+)"')  # a plain string literal: the file qualifier


@dataclass(frozen=True)
class Replacement:
    """FENTRY_REPLACE(old, new [, "file"]) at `line` of the patch."""

    old: str
    new: str
    file: str | None
    line: int
    checked: bool = True          # False: FENTRY_REPLACE_UNCHECKED (no prototype check)
    where: Path | None = None     # the file it is written in, when not the patch itself

    def spelled(self) -> str:
        file = f', "{self.file}"' if self.file is not None else ""
        macro = REPLACE_MACRO if self.checked else UNCHECKED_MACRO
        return f"{macro}({self.old}, {self.new}{file})"


@dataclass(frozen=True)
class OriginalUse:
    """FENTRY_ORIGINAL(old, type) or FENTRY_DECLARE_ORIGINAL(old) at `line`."""

    old: str
    macro: str
    line: int
    type: str = ""                # FENTRY_ORIGINAL's type, as written

    def spelled(self) -> str:
        return f"{self.macro}({self.old}, ...)" if self.macro == "FENTRY_ORIGINAL" else f"{self.macro}({self.old})"


@dataclass(frozen=True)
class Reference:
    """FENTRY_REF(name, type [, "file"]) at `line`: the program's own variable or function."""

    name: str
    type: str  # the type as written, for messages
    file: str | None
    line: int

    def spelled(self) -> str:
        file = f', "{self.file}"' if self.file is not None else ""
        return f"{REF_MACRO}({self.name}, {self.type}{file})"


@dataclass(frozen=True)
class NameUse:
    """A macro that takes one name: FENTRY_PRE_PATCH(fn)..., at `line`."""

    macro: str
    name: str
    line: int


@dataclass(frozen=True)
class PatchSource:
    """What the generator needs of a patch source."""

    path: Path
    replacements: tuple[Replacement, ...]
    originals: tuple[OriginalUse, ...]
    refs: tuple[Reference, ...] = ()
    callbacks: tuple[NameUse, ...] = ()      # FENTRY_PRE_PATCH(fn) ..., each macro at most once
    replace_all_line: int | None = None      # the line of FENTRY_REPLACE_ALL(), if any

    @property
    def replace_all(self) -> bool:
        return self.replace_all_line is not None

    def callback(self, field: str) -> NameUse | None:
        """The callback filling struct fentry_patch's `field` ("pre_patch"...), if any."""
        return next((c for c in self.callbacks if CALLBACK_MACROS[c.macro] == field), None)


class RecordReader:
    """Turns the records of one patch into a PatchSource, with a one-line error for each misuse."""

    def __init__(self, path: Path, main: Path | None = None) -> None:
        self._path = path
        self._main = (main or Path(path)).resolve()
        self._by_target: dict[tuple[str, str | None], Replacement] = {}
        self._by_new: dict[str, Replacement] = {}
        self._refs: dict[str, Reference] = {}
        self._once: dict[str, int] = {}
        self._in_main: dict[Path, bool] = {}  # resolve() is a system call per path component

    def _is_main(self, file: Path) -> bool:
        """Is `file` (a record's) the patch itself, not a header it includes?"""
        known = self._in_main.get(file)
        if known is None:
            known = self._in_main[file] = file.resolve() == self._main
        return known

    def _where(self, rec: Record) -> str:
        """`patch:line` (the patch as the generator was given it; a header by its own path)."""
        path = self._path if self._is_main(rec.file) else rec.file
        return f"{path}:{rec.line}"

    def _error(self, rec: Record, message: str) -> FentryError:
        return FentryError(f"{self._where(rec)}: {message}")

    def _file(self, rec: Record, value: str, what: str, usage: str) -> str | None:
        if not value:
            return None
        m = _FILE.fullmatch(value)
        if m is None:
            raise self._error(rec, f"the third argument of {what} must be the source file "
                              f"in quotes, like \"parser.c\", not '{value}'; {usage}")
        return m.group(1)

    def replacement(self, rec: Record) -> Replacement:
        old, new, file_arg = rec.args
        macro = REPLACE_MACRO if rec.kind == "replace" else UNCHECKED_MACRO
        for value, ordinal, what in ((old, "first", "the name of the program's function"),
                                     (new, "second", "the name of your replacement function")):
            if not _IDENT.fullmatch(value):
                raise self._error(rec, f"the {ordinal} argument of {macro} must be {what}, "
                                  f"not '{value}'; {REPLACE_USAGE}")
        file = self._file(rec, file_arg, macro, REPLACE_USAGE)
        where = None if self._is_main(rec.file) else rec.file
        rep = Replacement(old, new, file, rec.line, rec.kind == "replace", where)
        earlier = self._by_target.get((old, file))
        if earlier is not None:
            raise self._error(rec, f"{rep.spelled()} replaces {old} again (line {earlier.line} "
                              "already does); replace each function once: remove one of them")
        earlier = self._by_new.get(new)
        if earlier is not None:
            raise self._error(rec, f"{new} already replaces {earlier.old} (line {earlier.line}); "
                              f"{macro} can use a replacement once: write another function for {old}")
        self._by_target[(old, file)] = rep
        self._by_new[new] = rep
        return rep

    def reference(self, rec: Record) -> Reference:
        name, type_, file_arg = rec.args
        if not _IDENT.fullmatch(name):
            raise self._error(rec, f"the first argument of {REF_MACRO} must be the name of the "
                              f"program's variable or function, not '{name}'; {REF_USAGE}")
        if not type_ or '"' in type_:
            raise self._error(rec, f"the second argument of {REF_MACRO} must be the type of "
                              f"{name}, like long or int (const char *), not '{type_ or 'nothing'}'; "
                              f"{REF_USAGE}")
        ref = Reference(name, type_, self._file(rec, file_arg, REF_MACRO, REF_USAGE), rec.line)
        earlier = self._refs.get(name)
        if earlier is not None:
            raise self._error(rec, f"{ref.spelled()} references {name} again (line {earlier.line} "
                              f"already does); {REF_MACRO} defines fentry_ref__{name}, so a patch "
                              "can reference one thing per name: remove one of them")
        self._refs[name] = ref
        return ref

    def once(self, rec: Record, macro: str) -> int:
        earlier = self._once.get(macro)
        if earlier is not None:
            what = ("the patch is already cumulative" if macro == REPLACE_ALL_MACRO else
                    f"a patch has one {CALLBACK_MACROS[macro]} callback: call both "
                    "functions from one")
            raise self._error(rec, f"{macro} appears twice (line {earlier} already has it); "
                              f"{what}; remove one of them")
        self._once[macro] = rec.line
        return rec.line

    def callback(self, rec: Record) -> NameUse:
        macro = CALLBACK_KINDS[rec.kind]
        if not _IDENT.fullmatch(rec.args[0]):
            raise self._error(rec, f"{macro} takes the name of one function of the patch, not "
                              f"'{rec.args[0] or 'nothing'}'; {USAGES[macro]}")
        self.once(rec, macro)
        return NameUse(macro, rec.args[0], rec.line)


def patch_source(path: Path, records: list[Record], main: Path | None = None) -> PatchSource:
    """The PatchSource of the patch `path` (the file `main`, absolute: default `path` from
    the working folder) from the records of its compile."""
    reader = RecordReader(path, main)
    replacements: list[Replacement] = []
    originals: list[OriginalUse] = []
    refs: list[Reference] = []
    callbacks: list[NameUse] = []
    replace_all_line: int | None = None
    for rec in records:
        if rec.kind in ("replace", "replace_unchecked"):
            replacements.append(reader.replacement(rec))
        elif rec.kind == "ref":
            refs.append(reader.reference(rec))
        elif rec.kind in CALLBACK_KINDS:
            callbacks.append(reader.callback(rec))
        elif rec.kind == "replace_all":
            replace_all_line = reader.once(rec, REPLACE_ALL_MACRO)
        elif rec.kind in ("original", "declare_original") and _IDENT.fullmatch(rec.args[0]):
            macro = "FENTRY_ORIGINAL" if rec.kind == "original" else "FENTRY_DECLARE_ORIGINAL"
            originals.append(OriginalUse(rec.args[0], macro, rec.line, rec.args[1]))
    if not any(rec.kind == "fentry.h" for rec in records):
        raise FentryError(f"{path} does not #include <fentry.h>, so its FENTRY_* macros mean "
                          "nothing to the compiler; include it (patch_dep / -I of fentry.h)")
    if not replacements:
        raise FentryError(
            f"{path}: no {REPLACE_MACRO}(old, new) in this patch (as its build compiles it: "
            f"none under a false #if either); add one per function it replaces, e.g. "
            f"{REPLACE_MACRO}(compute, compute_fixed);")
    return PatchSource(path, tuple(replacements), tuple(originals), tuple(refs), tuple(callbacks),
                       replace_all_line)


__all__ = ["CALLBACK_MACROS", "NameUse", "OriginalUse", "PatchSource", "REF_MACRO",
           "REPLACE_MACRO", "Reference", "Replacement", "patch_source"]
