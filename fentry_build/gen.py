"""gen.py - the patch generator: checks a patch against the built program and writes its registration C source."""

from __future__ import annotations

import argparse
import difflib
import os
import posixpath
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from fentry_build import paths
from fentry_build.elfinfo import BinaryInfo, FunctionInfo, read_binary, site_bytes_hex
from fentry_build.errors import FentryError
from fentry_build.patchsrc import PatchSource, Replacement, parse_patch

TEMPLATE = "registration.c.j2"
BUILD_ID_MAX = 64  # FENTRY_BUILD_ID_MAX in fentry.h
INSTRUMENT_FIX = "compile its source{where} with dependency('fentry') / -pg -mfentry"
CLONE_FIX = "build the program with -flive-patching=inline-only-static so GCC keeps {name} whole"

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


def file_matches(file: str | None, wanted: str) -> bool:
    """Does the qualifier `wanted` name `file`? Either may be the longer path ("src/a.c" ~ "a.c")."""
    if file is None:
        return False
    a, b = posixpath.normpath(file), posixpath.normpath(wanted)
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def _where(f: FunctionInfo) -> str:
    kind = "static" if f.local else "global"
    return f"{kind} in {f.file}" if f.file else f"{kind} in an unknown file"


def _names(functions: list[FunctionInfo]) -> str:
    return ", ".join(f.name for f in functions)


class ReplacementResolver:
    """Finds the function each FENTRY_REPLACE names, or says exactly why it cannot be patched."""

    def __init__(self, index: FunctionIndex, patch: PatchSource, warn: Warn) -> None:
        self._index = index
        self._patch = patch
        self._warn = warn
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
        self._warn_clones(rep)
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

    def _warn_clones(self, rep: Replacement) -> None:
        clones = [c for c in self._index.clones_of(rep.old) if c.site is not None]
        if clones:
            self._warn(
                f"{self._patch.path}:{rep.line}: GCC also made the IPA clone(s) {_names(clones)} of "
                f"{rep.old}; callers of a clone keep running the old code: {CLONE_FIX.format(name=rep.old)}")


def _orig_symbols(replacements: Sequence[Replacement]) -> list[str]:
    """fentry_orig__ names: the first replacement of a name keeps it, later ones get __2, __3..."""
    seen: dict[str, int] = {}
    names = []
    for rep in replacements:
        seen[rep.old] = seen.get(rep.old, 0) + 1
        names.append(rep.old if seen[rep.old] == 1 else f"{rep.old}__{seen[rep.old]}")
    return names


def resolve_patch(binary: BinaryInfo, patch: PatchSource, warn: Warn) -> list[ResolvedReplacement]:
    """Every FENTRY_REPLACE of `patch` resolved against `binary`, each function once."""
    resolver = ReplacementResolver(FunctionIndex(binary), patch, warn)
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


def _environment() -> jinja2.Environment:
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


def render(binary: BinaryInfo, patch: PatchSource, resolved: Sequence[ResolvedReplacement]) -> str:
    """The registration C source for `resolved` replacements of `patch` in `binary`."""
    build_id = check_build_id(binary)
    funcs = [_func_context(r, patch.path.name) for r in resolved]
    renamed = [
        {"old": r.replacement.old, "orig_symbol": r.orig_symbol, "file": r.replacement.file or "?"}
        for r in resolved if r.orig_symbol != r.replacement.old
    ]
    return _environment().get_template(TEMPLATE).render(
        target=binary.path.name, patch_name=patch.path.name, build_id=build_id,
        build_id_hex=build_id.hex(), funcs=funcs, renamed=renamed,
    )


def _stderr_warning(message: str) -> None:
    print(f"fentry-gen: warning: {message}", file=sys.stderr)


def generate(binary: Path, patch: Path, warn: Warn | None = None) -> str:
    """The registration source for the patch source `patch` against the built `binary`.

    Raises FentryError (one line naming the function and the fix) for anything the
    build can catch; warnings (IPA clones left unpatched) go to `warn`, default stderr.
    """
    info = read_binary(binary)
    check_build_id(info)
    source = parse_patch(patch)
    resolved = resolve_patch(info, source, warn or _stderr_warning)
    return render(info, source, resolved)


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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        text = generate(args.binary, args.patch)
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
