"""generator/main.py - the patch generator: checks a patch against the built program and writes its registration C source."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from fentry_build import paths
from fentry_build.binary.dwarf import DWARF_ERRORS, ProgramDwarf, program_dwarf
from fentry_build.binary.elf import (
    BinaryInfo, DataSymbol, FunctionInfo, file_matches, read_binary, site_bytes_hex,
)
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CLONE_FIX, NOINLINE_FIX, CopyFinder, describe, no_dwarf_note
from fentry_build.generator.patchsrc import CALLBACK_MACROS, PatchSource, Reference, Replacement, parse_patch

TEMPLATE = "registration.c.j2"
BUILD_ID_MAX = 64  # FENTRY_BUILD_ID_MAX in fentry.h
INSTRUMENT_FIX = "compile its source{where} with dependency('fentry') / -pg -mfentry"
STRICT_ENV = "FENTRY_STRICT"
STRICT_NOTE = "an error because of --strict / FENTRY_STRICT=1"

Warn = Callable[[str], None]


@dataclass(frozen=True)
class ResolvedReplacement:
    """A FENTRY_REPLACE of the patch and the program's function it replaces."""

    replacement: Replacement
    function: FunctionInfo
    orig_symbol: str  # the name after fentry_orig__ (old, or old__2... for repeats)


class FunctionIndex:
    """The binary's functions by name, with the IPA clones of each by the name they copy."""

    def __init__(self, binary: BinaryInfo) -> None:
        self.binary = binary
        self._by_name: dict[str, list[FunctionInfo]] = {}
        self._clones: dict[str, list[FunctionInfo]] = {}
        for f in binary.functions:
            clone = f.clone
            if not clone.is_clone:
                self._add_unique(self._by_name.setdefault(f.name, []), f)
            elif not clone.is_alias and not clone.is_cold_part:
                self._clones.setdefault(clone.base, []).append(f)

    @staticmethod
    def _add_unique(group: list[FunctionInfo], f: FunctionInfo) -> None:
        if all(g.addr != f.addr for g in group):  # a symbol seen twice is one function
            group.append(f)

    def named(self, name: str) -> list[FunctionInfo]:
        return list(self._by_name.get(name, []))

    def clones_of(self, name: str) -> list[FunctionInfo]:
        return list(self._clones.get(name, []))

    def close_names(self, name: str) -> list[str]:
        names = set(self._by_name) | set(self._clones)
        return difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)


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
        self._program = index.binary.path.name

    def _error(self, rep: Replacement, message: str) -> FentryError:
        return FentryError(f"{self._patch.path}:{rep.line}: {message}")

    def resolve(self, rep: Replacement) -> FunctionInfo:
        candidates = self._index.named(rep.old)
        if not candidates:
            raise self._missing(rep)
        if rep.file is not None:
            candidates = self._in_file(rep, candidates)
        if len(candidates) > 1:
            raise self._ambiguous(rep, candidates)
        function = candidates[0]
        if function.site is None:
            where = f" ({function.file})" if function.file else ""
            raise self._error(rep, f"{rep.old} in {self._program} is not instrumented (no call to "
                              f"__fentry__ at its entry); {INSTRUMENT_FIX.format(where=where)}")
        return function

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
        if close:
            return self._error(
                rep, f"no function {rep.old} in {self._program}; did you mean {' or '.join(close)}? "
                f"Fix the first argument of {rep.spelled()}")
        return self._error(
            rep, f"no function {rep.old} in {self._program}; fix the first argument of "
            f"{rep.spelled()}, or if {rep.old} is in a shared library, build the patch for that library")

    def _in_file(self, rep: Replacement, candidates: list[FunctionInfo]) -> list[FunctionInfo]:
        assert rep.file is not None
        matching = [f for f in candidates if file_matches(f.file, rep.file)]
        if not matching:
            found = "; ".join(_where(f) for f in candidates)
            raise self._error(
                rep, f"no function {rep.old} of file \"{rep.file}\" in {self._program} "
                f"({rep.old} is {found}); fix the third argument of {rep.spelled()}")
        return matching

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
    for rep, orig in zip(patch.replacements, _orig_symbols(patch.replacements)):
        function = resolver.resolve(rep)
        for earlier in resolved:
            if earlier.function.addr == function.addr:
                raise FentryError(
                    f"{patch.path}:{rep.line}: {rep.spelled()} replaces the same function as "
                    f"line {earlier.replacement.line}; replace each function once")
        resolved.append(ResolvedReplacement(rep, function, orig))
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
        self._program = binary.path.name

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


def code_copy_findings(binary: BinaryInfo, patch: PatchSource,
                       resolved: Sequence[ResolvedReplacement], finder: CopyFinder) -> list[str]:
    """One line per replaced function whose code also runs elsewhere (inlined copies, IPA
    clones), and once a note when the program has no DWARF to look for inlined copies."""
    replaced = {r.function.addr for r in resolved}
    program = binary.path.name
    lines = []
    for r in resolved:
        message = describe(finder.copies(r.function), replaced, program, binary.has_dwarf)
        if message is not None:
            lines.append(f"{patch.path}:{r.replacement.line}: {message}")
    if not binary.has_dwarf:
        note = no_dwarf_note(program)
        if lines:
            lines[0] += f" ({note})"
        else:
            lines.append(f"{patch.path}: {note}")
    return lines


def check_build_id(binary: BinaryInfo) -> bytes:
    if binary.build_id is None:
        raise FentryError(
            f"{binary.path} has no GNU build-id, so a patch cannot be matched to this build; "
            "link it with -Wl,--build-id")
    if len(binary.build_id) > BUILD_ID_MAX:
        raise FentryError(
            f"{binary.path} has a {len(binary.build_id)}-byte build-id, more than the "
            f"{BUILD_ID_MAX} a patch can hold; link it with -Wl,--build-id=sha1")
    return binary.build_id


def c_string(value: str | None) -> str:
    """A C string literal for `value` (NULL for None); octal escapes for everything unusual."""
    if value is None:
        return "NULL"
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch in "\\\"":
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F and ch != "?":  # '?' avoids trigraphs
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_bytes(data: bytes) -> str:
    return ", ".join(f"0x{b:02x}" for b in data)


def c_comment(value: str) -> str:
    """Text safe inside a /* */ comment: no comment end, no newline."""
    return value.replace("*/", "*\\/").replace("/*", "/\\*").replace("\n", " ").replace("\r", " ")


def template_environment() -> jinja2.Environment:
    """The jinja2 environment of the generated C sources: C string, bytes and comment filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(c_string=c_string, c_bytes=c_bytes, c_comment=c_comment)
    return env


def _func_context(r: ResolvedReplacement, patch_name: str) -> dict[str, Any]:
    f, rep = r.function, r.replacement
    assert f.site is not None
    return {
        "name": f.name, "file": f.file if f.local else None, "addr": f.addr,
        "site_offset": f.site.offset, "site_len": f.site.length, "site_form": f.site.form.c_name,
        "site_bytes": site_bytes_hex(f.site), "entry": f.site.entry,
        "new": rep.new, "old": rep.old, "orig_symbol": r.orig_symbol,
        "spelled": rep.spelled(), "line": rep.line, "patch_name": patch_name,
    }


def _ref_context(r: ResolvedRef, patch_name: str) -> dict[str, Any]:
    sym = r.symbol
    return {
        "slot": r.ref.name, "name": sym.name, "file": sym.file if sym.local else None,
        "addr": sym.addr, "size": sym.size, "kind": sym.kind, "spelled": r.ref.spelled(),
        "line": r.ref.line, "patch_name": patch_name,
    }


def render(binary: BinaryInfo, patch: PatchSource, resolved: Sequence[ResolvedReplacement],
           refs: Sequence[ResolvedRef] = ()) -> str:
    """The registration C source for `resolved` replacements and `refs` of `patch` in `binary`."""
    build_id = check_build_id(binary)
    funcs = [_func_context(r, patch.path.name) for r in resolved]
    renamed = [
        {"old": r.replacement.old, "orig_symbol": r.orig_symbol, "file": r.replacement.file or "?"}
        for r in resolved if r.orig_symbol != r.replacement.old
    ]
    callbacks = []
    for macro, field_name in CALLBACK_MACROS.items():
        use = patch.callback(field_name)
        callbacks.append({
            "field": field_name, "macro": macro,
            "type": "fentry_pre_patch_fn" if field_name == "pre_patch" else "fentry_callback_fn",
            "fn": use.name if use else None, "line": use.line if use else None,
        })
    return template_environment().get_template(TEMPLATE).render(
        target=binary.path.name, patch_name=patch.path.name, build_id=build_id,
        build_id_hex=build_id.hex(), funcs=funcs, renamed=renamed,
        refs=[_ref_context(r, patch.path.name) for r in refs], callbacks=callbacks,
        replace_all=patch.replace_all, replace_all_line=patch.replace_all_line,
    )


def _stderr_warning(message: str) -> None:
    print(f"fentry-gen: warning: {message}", file=sys.stderr)


def generate(binary: Path, patch: Path, warn: Warn | None = None, *, strict: bool = False) -> str:
    """The registration source for the patch source `patch` against the built `binary`.

    Raises FentryError (one line naming the function and the fix) for anything the
    build can catch.  Code the patch does not reach (inlined copies, IPA clones of a
    replaced function) and a program without DWARF are warnings, one line per function,
    sent to `warn` (default: stderr) - or, with `strict`, the first is a FentryError.
    """
    info = read_binary(binary)
    check_build_id(info)
    source = parse_patch(patch)
    try:
        with program_dwarf(binary) as dwarf:
            finder = CopyFinder(info, dwarf)
            resolved = resolve_patch(info, source, finder=finder)
            refs = resolve_refs(info, source, dwarf, finder)
            findings = code_copy_findings(info, source, resolved, finder)
    except OSError as e:
        raise FentryError(f"cannot read {binary}: {e.strerror or e}; pass the built program") from None
    if strict and findings:
        raise FentryError(f"{findings[0]} ({STRICT_NOTE})")
    for line in findings:
        (warn or _stderr_warning)(line)
    return render(info, source, resolved, refs)


def strict_from_environment(environ: dict[str, str] | None = None) -> bool:
    """FENTRY_STRICT=1 (or yes/true/on) turns warnings into errors without editing the command."""
    value = (os.environ if environ is None else environ).get(STRICT_ENV, "")
    return value.strip().lower() in ("1", "yes", "true", "on")


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (always: build tools need the touch)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fentry_build.gen",
        description="Write the registration C source of a live patch for a built program.",
    )
    p.add_argument("--binary", required=True, type=Path, help="the built program or shared library")
    p.add_argument("--patch", required=True, type=Path, help="the patch source (.c)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the registration source to write")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) where the generator would warn: inlined copies or IPA clones "
                        f"of a replaced function, no DWARF to check for them (also: {STRICT_ENV}=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        text = generate(args.binary, args.patch, strict=args.strict or strict_from_environment())
        write_atomically(args.output, text)
    except FentryError as e:
        print(f"fentry-gen: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fentry-gen: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
