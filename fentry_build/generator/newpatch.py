"""generator/newpatch.py - `fentry-build new-patch`: a patch skeleton for one function, its prototype read from DWARF.

The skeleton (templates/new_patch.c.j2) replaces the function F with `F_fixed`, which
calls the original through FENTRY_ORIGINAL: built and applied unchanged, it changes
nothing, and it is the place to write the fix.  F's exact prototype - return type and
parameters, as C declarators - comes from the program's DWARF (CTypeWriter), and the
types it names come from the headers that declared them (TypeSources).  The patch is
written to <project>/patches/NAME.c and added to the project's patch list (the
`patches = {...}` dict of meson.build or of the SConstruct: build/patchlist.py).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from elftools.dwarf.die import DIE

from fentry_build import jinja
from fentry_build.binary.dwarf import DWARF_ERRORS, ProgramDwarf, die_name
from fentry_build.binary.elf import FunctionInfo
from fentry_build.binary.program import Program
from fentry_build.build import patchlist
from fentry_build.generator.cdecl import (
    REPLACEMENT_SUFFIX, CTypeWriter, prototype_of, type_of,
)
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CLONE_FIX, CopyFinder, describe
from fentry_build.generator.resolve import (
    AmbiguousFunction, FunctionIndex, NoSuchFunction, NotInFile, NotInstrumented,
)

TEMPLATE = "new_patch.c.j2"
PATCH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
INSTRUMENT_FIX = "compile its source with dependency('fentry') / -pg -mfentry"

# glibc's internal headers that may not be included directly, and the public header to use.
PUBLIC_HEADERS = {
    "bits/types.h": "sys/types.h",
    "bits/stdint-intn.h": "stdint.h",
    "bits/stdint-uintn.h": "stdint.h",
    "bits/types/FILE.h": "stdio.h",
    "bits/types/__FILE.h": "stdio.h",
    "bits/types/struct_FILE.h": "stdio.h",
    "bits/types/time_t.h": "time.h",
    "bits/types/clock_t.h": "time.h",
    "bits/types/struct_tm.h": "time.h",
    "bits/types/struct_timespec.h": "time.h",
    "bits/types/struct_timeval.h": "sys/time.h",
    "bits/types/sigset_t.h": "signal.h",
    "bits/types/__sigset_t.h": "signal.h",
    "bits/types/struct_iovec.h": "sys/uio.h",
    "bits/struct_stat.h": "sys/stat.h",
    "bits/socket.h": "sys/socket.h",
    "bits/pthreadtypes.h": "pthread.h",
    "bits/thread-shared-types.h": "pthread.h",
}
DEFAULT_SYSTEM_DIRS = ("/usr/local/include", "/usr/include/x86_64-linux-gnu", "/usr/include")
GCC_INCLUDE = re.compile(r"/usr/lib/gcc/[^/]+/[^/]+/include(?:-fixed)?")


# ---- where the named types come from ----------------------------------------------------------


@functools.cache
def system_include_dirs() -> tuple[str, ...]:
    """gcc's #include <...> search list (the defaults when gcc cannot be asked)."""
    try:
        proc = subprocess.run(["gcc", "-E", "-Wp,-v", "-xc", os.devnull], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_SYSTEM_DIRS
    lines = proc.stderr.splitlines()
    try:
        start = lines.index("#include <...> search starts here:") + 1
        end = lines.index("End of search list.", start)
    except ValueError:
        return DEFAULT_SYSTEM_DIRS
    return tuple(posixpath.normpath(line.strip()) for line in lines[start:end]) or DEFAULT_SYSTEM_DIRS


def system_header(path: str) -> str | None:
    """`stdio.h` for /usr/include/stdio.h: the <name> of a header in a system include folder."""
    dirs = sorted({*system_include_dirs(), *DEFAULT_SYSTEM_DIRS}, key=len, reverse=True)
    for d in dirs:
        if path.startswith(d + "/"):
            rel = path[len(d) + 1:]
            return PUBLIC_HEADERS.get(rel, rel)
    m = GCC_INCLUDE.match(path)
    if m and path.startswith(m.group(0) + "/"):
        return path[m.end() + 1:]
    return None


@dataclass
class Include:
    spelled: str  # <stdio.h> or "../parser.h"
    types: list[str] = field(default_factory=list)


class TypeSources:
    """For each type the prototype names: the header to include, or a declaration to repeat
    (a type declared in a .c file of the program cannot be included)."""

    def __init__(self, dwarf: ProgramDwarf, writer: CTypeWriter, patch_dir: Path) -> None:
        self._dwarf = dwarf
        self._writer = writer
        self._patch_dir = patch_dir
        self.includes: dict[str, Include] = {}
        self.declarations: list[str] = []
        self._done: set[int] = set()

    def resolve(self) -> None:
        for offset in list(self._writer.named):
            self._provide(self._writer.named[offset])
        for header, types in self._writer.builtin_includes.items():
            self.includes.setdefault(header, Include(header)).types.extend(types)

    def _provide(self, t: DIE) -> None:
        if t.offset in self._done:
            return
        self._done.add(t.offset)
        spelled = self._writer.declare(t, by_value=False)
        path = self._dwarf.decl_file(t)
        header = self._include_for(path) if path else None
        if header is not None:
            self.includes.setdefault(header, Include(header)).types.append(spelled)
            return
        # Declared in a .c file (or nowhere known): repeat its declaration, after the
        # declarations of the types it is made of.
        before = set(self._writer.named)
        where = f"from {path}" if path else "from the DWARF"
        if t.tag == "DW_TAG_typedef":
            by_value = t.offset in self._writer.complete
            target = self._writer.declare(type_of(t), die_name(t) or "", by_value=by_value)
            definition = f"typedef {target};"
        elif t.tag == "DW_TAG_enumeration_type":
            definition = self._enum_definition(t)
        elif t.offset in self._writer.complete:
            definition = f"/* {where}: keep it identical */\n{self._writer.record_definition(t)}"
        else:
            definition = f"{spelled}; /* {where}: only pointers to it are used */"
        for offset in [o for o in self._writer.named if o not in before]:
            self._provide(self._writer.named[offset])
        self.declarations.append(definition)

    def _include_for(self, path: str) -> str | None:
        header = system_header(path)
        if header is not None:
            return f"<{header}>"
        if not path.endswith((".h", ".hh", ".hpp", ".inc", ".def")):
            return None
        return '"' + os.path.relpath(path, self._patch_dir.resolve()) + '"'

    @staticmethod
    def _enum_definition(t: DIE) -> str:
        values = []
        for e in t.iter_children():
            if e.tag == "DW_TAG_enumerator":
                values.append(f"{die_name(e)} = {e.attributes['DW_AT_const_value'].value}")
        return f"enum {die_name(t)} {{ {', '.join(values)} }};"


# ---- the command ------------------------------------------------------------------------------


@dataclass
class NewPatchResult:
    path: Path
    function: str
    file: str | None       # the third argument of FENTRY_REPLACE (static functions)
    replacement: str
    registration: patchlist.Registration  # the patch list it was added to, the commands
    notes: list[str] = field(default_factory=list)


def _find_function(index: FunctionIndex, name: str, file: str | None, program: str) -> FunctionInfo:
    """The function --function (and --file) name, through the generator's lookup; the
    failures phrased for the command line."""
    try:
        return index.lookup(name, file, any_symbol=True)
    except NoSuchFunction as e:
        if e.candidates:
            raise FentryError(
                f"{name} has no body of its own in {program}: GCC made only the IPA clone(s) "
                f"{', '.join(c.name for c in e.candidates)}, which its callers call instead; "
                f"{CLONE_FIX.format(name=name)}") from None
        close = index.close_names(name, clone_bases=False)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise FentryError(f"no function {name} in {program}; {hint}pass --function the name of "
                          "one of its functions") from None
    except NotInFile as e:
        found = "; ".join(f"{'static' if f.local else 'global'} in {f.file or 'an unknown file'}"
                          for f in e.candidates)
        raise FentryError(f"no function {name} of file \"{file}\" in {program} ({name} is "
                          f"{found}); fix --file") from None
    except AmbiguousFunction as e:
        files = ", ".join(f.file or "an unknown file" for f in e.candidates)
        example = next((f.file for f in e.candidates if f.file), "file.c")
        raise FentryError(f"{name} is ambiguous in {program}: {len(e.candidates)} functions have "
                          f"that name (in {files}); add --file {example}") from None
    except NotInstrumented:
        raise FentryError(f"{name} in {program} is not instrumented (no call to __fentry__ at its "
                          f"entry), so no patch can replace it; {INSTRUMENT_FIX}") from None


def _render_skeleton(program: Program, f: FunctionInfo, patch_name: str,
                     patch_dir: Path) -> tuple[str, list[str]]:
    """The skeleton's text and notes (copies of f the patch will not reach, variadic...)."""
    notes: list[str] = []
    name = program.name
    dwarf = program.dwarf
    if dwarf is None:
        raise FentryError(
            f"new-patch reads {f.name}'s prototype from the DWARF of {name}, which has "
            "none: build it with -g (dependency('fentry') and the SCons tool add it)")
    try:
        die = dwarf.subprogram_at(f.addr)
        if die is None:
            raise FentryError(
                f"no DWARF for {f.name} in {name} ({f.file or 'its file'} was compiled "
                "without -g); compile it with -g")
        writer = CTypeWriter()
        proto = prototype_of(die, f.name, writer)
        sources = TypeSources(dwarf, writer, patch_dir)
        sources.resolve()
        message = describe(CopyFinder(program.info, dwarf).copies(f), {f.addr}, name, True)
    except DWARF_ERRORS as e:
        raise FentryError(f"cannot read the DWARF of {name} ({e}); "
                          "rebuild it with gcc -g") from None
    if message:
        notes.append(message)
    if proto.variadic:
        notes.append(f"{f.name} is variadic: the skeleton passes only its named arguments on to "
                     "the original; write the body yourself (C cannot forward `...`)")
    skeleton = jinja.environment().get_template(TEMPLATE).render({
        "name": patch_name, "program": name, "function": f.name,
        "file": f.file if f.local else None, "proto": proto,
        "includes": sorted(sources.includes.values(), key=lambda i: (i.spelled[0] != "<", i.spelled)),
        "declarations": sources.declarations,
    })
    return skeleton, notes


def new_patch(name: str, function: str, binary: Path, project_dir: Path = Path("."),
              file: str | None = None) -> NewPatchResult:
    """Write <project_dir>/patches/<name>.c replacing `function` of `binary`, and register it
    in the project's meson.build; FentryError (one line) for anything that stops it."""
    if not PATCH_NAME.fullmatch(name):
        raise FentryError(f"{name!r} is not a usable patch name (letters, digits, _ and -; it "
                          "names patches/NAME.c and build/NAME.so); pick another")
    project_dir = project_dir.resolve()
    if not project_dir.is_dir():
        raise FentryError(f"{project_dir}: no such directory; pass --project with the project's "
                          "top folder")
    path = project_dir / "patches" / f"{name}.c"
    if path.exists():
        raise FentryError(f"{path} already exists; new-patch never overwrites a patch: pick another "
                          "name or remove it")
    patchlist.check_new_name(project_dir, name)
    with Program.open(binary) as program:
        f = _find_function(FunctionIndex(program.info), function, file, program.name)
        skeleton, notes = _render_skeleton(program, f, name, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as out:  # "x": never overwrite, even in a race
        out.write(skeleton)
    registration = patchlist.register(project_dir, name, binary)
    return NewPatchResult(path, f.name, f.file if f.local else None, f.name + REPLACEMENT_SUFFIX,
                          registration, notes)


def format_result(result: NewPatchResult) -> str:
    where = f" of {result.file}" if result.file else ""
    lines = [f"wrote {result.path}: {result.replacement} replaces {result.function}{where} and "
             "calls the original (edit it to make the fix)"]
    lines += result.registration.entry_lines()
    lines += [f"note: {n}" for n in result.notes]
    lines += ["", *(f"  {c}" for c in result.registration.commands)]
    return "\n".join(lines)


__all__ = ["NewPatchResult", "format_result", "new_patch"]
