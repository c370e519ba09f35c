"""generator/scan.py - the patch compiled as its build compiles it, to find its FENTRY_* uses and check its types.

The generator never reads C itself.  It compiles the patch with the patch's own compile
line (compile_commands.json: Meson writes it; SCons passes the line after ``--``), our
fentry.h first on the include path, and -DFENTRY_GEN_SCAN: fentry.h's macros then leave
records of their uses in the object's section .fentry.scan (its bytes read with pyelftools), so
#if 0, #ifdef and macros that expand to ours are seen exactly as the compiler sees them.
The prototype check compiles it once more with -DFENTRY_GEN_CHECK (generator/protocheck.py).
Diagnostics are read as GCC's JSON (-fdiagnostics-format=json), never scraped from text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from fentry_build import paths
from fentry_build.binary.elf import ELF_ERRORS
from fentry_build.errors import FentryError
from fentry_build.generator import compile_db

SECTION = ".fentry.scan"
# Each record starts with this mark (fentry.h, FENTRY__RECORD_N, writes it as the C string
# RECORD_MARK_C; tests/test_facts.py checks the two agree).  Splitting the section there
# reads records without the symbol table: pyelftools parsing one symbol at a time was a
# sixth of a 10,000-function patch's generator run.
RECORD_MARK = b"\x01fentry-scan\x00"
RECORD_MARK_C = r'"\001fentry-scan\0"'
DEFAULT_COMPILER = "gcc"
# No compile line given (no `--`) and none in a compile_commands.json: what older Meson
# snippets and hand-run generators get.  The patch's own folder is searched for its
# "quoted" includes by the compiler anyway, fentry.h's folder is added (command()).
DEFAULT_ORIGIN = "gcc alone: no compile line after -- and no compile_commands.json entry"
DEFAULT_FIX = ("pass the patch's compile line after --, e.g. `python -m fentry_build.gen ... "
               "-- gcc -Iinclude -DNAME`")
# Compiled for the records only: fast, warning-free whatever the patch's flags, no LTO
# (an LTO object holds no sections of ours); -g and every static function kept, for the
# replacements' prototypes in messages.
SCAN_FLAGS = ["-DFENTRY_GEN_SCAN", "-O0", "-g", "-w", "-fno-lto", "-fkeep-static-functions"]
# The compiler's own words about our macros' internals, and what the user wrote instead.
HINTS = (
    (re.compile(r"'fentry_ref__(\w+)' undeclared"),
     "FENTRY_VAR({0}) but the patch has no FENTRY_REF({0}, type); add it at file scope, e.g. "
     "FENTRY_REF({0}, long);"),
    (re.compile(r"'fentry_orig__(\w+)' undeclared"),
     "FENTRY_ORIGINAL({0}, type) needs FENTRY_DECLARE_ORIGINAL({0}); at file scope before it, "
     "and FENTRY_REPLACE({0}, ...) in the patch"),
    (re.compile(r"(?:conflicting types for|redefinition of) 'fentry_ref__(\w+)'"),
     "FENTRY_REF({0}, ...) references {0} again; FENTRY_REF defines fentry_ref__{0}, so a patch "
     "can reference one thing per name: remove one of them"),
)


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic of the compiler (from its JSON output)."""

    kind: str       # "error", "warning", "note"
    message: str
    file: str
    line: int
    column: int

    def spelled(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}: " if self.file else ""
        return f"{where}{self.message}"


def diagnostics(stderr: str) -> list[Diagnostic]:
    """The diagnostics of a compile run with -fdiagnostics-format=json (children included)."""
    found: list[Diagnostic] = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line.startswith("["):
            continue
        try:
            items = json.loads(line)
        except ValueError:
            continue
        stack = list(items) if isinstance(items, list) else []
        while stack:
            d = stack.pop(0)
            if not isinstance(d, dict):
                continue
            caret = (d.get("locations") or [{}])[0].get("caret", {}) if d.get("locations") else {}
            found.append(Diagnostic(str(d.get("kind", "")), str(d.get("message", "")),
                                    str(caret.get("file", "")), int(caret.get("line", 0)),
                                    int(caret.get("column", 0))))
            stack[0:0] = d.get("children", [])
    return found


@dataclass(frozen=True)
class Record:
    """One use of a FENTRY_* macro, as the compiler saw it."""

    kind: str                     # replace, replace_unchecked, original, declare_original,
                                  # ref, pre_patch ..., replace_all
    file: Path                    # the file it is written in (the patch, or a header it includes)
    line: int
    args: tuple[str, str, str]    # the macro's arguments as written ("" when absent)
    order: int                    # source order


@dataclass(frozen=True)
class PatchCompile:
    """How the patch's build compiles it: compiler, options (no output, dependency or source
    arguments), the folder it runs in and the source as spelled there."""

    compiler: str
    options: tuple[str, ...]
    cwd: Path
    source: str
    origin: str   # where the line comes from, for messages
    database: Path | None = None  # the compile_commands.json it comes from

    @classmethod
    def find(cls, patch: Path, near: Path | None = None,
             explicit: list[str] | None = None) -> PatchCompile:
        """The patch's compile line: `explicit` (a compiler and its options, what SCons
        passes), else its entry in the compile_commands.json of the build folder holding
        `near` (the generator's output) or the working folder, else gcc with no options."""
        source = os.path.abspath(patch)
        if explicit:
            return cls(explicit[0], tuple(explicit[1:]), Path.cwd(), str(patch),
                       "the compile line given after --")
        for start in [p for p in (near, Path.cwd()) if p is not None]:
            folder = Path(os.path.abspath(start))
            for candidate in [folder, *folder.parents]:
                db = candidate / compile_db.DB_NAME
                if not db.is_file():
                    continue
                for entry in compile_db.load(db):
                    if str(entry.file) == os.path.normpath(source):
                        line = compile_db.CompileLine(entry, compile_db.PathMover(entry.directory,
                                                                                  entry.directory))
                        return cls(entry.compiler, tuple(line.options()), entry.directory,
                                   source, f"{db}", db)
                break  # the nearest database is the build's: do not look further up
        return cls(DEFAULT_COMPILER, (), Path.cwd(), str(patch), DEFAULT_ORIGIN)

    def command(self, extra: list[str]) -> list[str]:
        """The compile line with our fentry.h first and `extra` options, on the source."""
        return [self.compiler, f"-I{paths.include_dir()}", *self.options, *extra,
                "-fdiagnostics-format=json", self.source]

    def run(self, extra: list[str]) -> tuple[int, list[Diagnostic], str]:
        env = {**os.environ, "LC_ALL": "C"}  # the compiler's messages in ASCII quotes
        try:
            proc = subprocess.run(self.command(extra), cwd=self.cwd, capture_output=True,
                                  text=True, errors="replace", env=env, timeout=600)
        except OSError as e:
            raise FentryError(f"cannot run the compiler {self.compiler} ({e.strerror or e}); the "
                              "generator compiles the patch to find its FENTRY_* uses") from None
        return proc.returncode, diagnostics(proc.stderr), proc.stderr

    def file_of(self, spelled: str) -> Path:
        """A file as the compiler named it (__FILE__, diagnostics), absolute."""
        return compile_db.normal(spelled, self.cwd)


def compile_error(patch: Path, compile: PatchCompile, found: list[Diagnostic], stderr: str,
                  code: int) -> FentryError:
    """One line for a patch that does not compile: the compiler's first error (with our hint
    when it is about a macro of ours) and where the compile line came from."""
    errors = [d for d in found if d.kind in ("error", "fatal error")]
    if errors:
        first = errors[0]
        for pattern, hint in HINTS:
            m = pattern.search(first.message)
            if m:
                return FentryError(f"{first.file}:{first.line}: {hint.format(m.group(1))}")
        text = first.spelled()
    else:
        text = next((ln for ln in stderr.splitlines() if "error" in ln), stderr.strip()) or \
            f"exit status {code}"
    if compile.origin == DEFAULT_ORIGIN:
        return FentryError(f"{patch} does not compile: {text} (compiled with {compile.origin}); "
                           f"fix the patch, or {DEFAULT_FIX}")
    return FentryError(f"{patch} does not compile: {text} (compiled as its build compiles it: "
                       f"{compile.origin}); fix the patch")


@dataclass(frozen=True)
class Scanned:
    """What the scan compile gave: the records, the object (with the patch's DWARF), and the
    files the patch's compile read (the patch and its headers)."""

    records: list[Record]
    object: Path
    inputs: list[Path]


def scan(patch: Path, compile: PatchCompile, work: Path) -> Scanned:
    """The records of the FENTRY_* uses of `patch` and what else its compile gave.
    FentryError when the patch does not compile."""
    obj, deps = work / "scan.o", work / "scan.d"
    code, found, stderr = compile.run([*SCAN_FLAGS, "-c", "-o", str(obj), "-MD", "-MF", str(deps)])
    if code != 0 or not obj.is_file():
        raise compile_error(patch, compile, found, stderr, code)
    try:
        inputs = compile_db.dependencies(deps, compile.cwd) if deps.is_file() else []
    except OSError:
        inputs = []
    try:
        with open(obj, "rb") as stream:
            return Scanned(read_records(ELFFile(stream), compile), obj, inputs)
    except (OSError, *ELF_ERRORS) as e:
        raise FentryError(f"cannot read the generator's object of {patch} ({e}); is "
                          f"{compile.compiler} gcc?") from None


def read_records(elf: ELFFile, compile: PatchCompile) -> list[Record]:
    section = elf.get_section_by_name(SECTION)
    if section is None:
        return []
    records = []
    for chunk in section.data().split(RECORD_MARK)[1:]:
        # order, kind, file, line, three arguments; then the array's NUL and any padding
        fields = chunk.decode("utf-8", "replace").split("\0")
        if len(fields) < 7 or not fields[0].isdigit() or not fields[3].isdigit():
            continue
        order, kind, file, line, a, b, c = fields[:7]
        records.append(Record(kind, compile.file_of(file), int(line), (a, b, c), int(order)))
    return sorted(records, key=lambda r: r.order)


__all__ = ["Diagnostic", "PatchCompile", "Record", "Scanned", "compile_error", "diagnostics", "scan"]
