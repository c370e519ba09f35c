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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from elftools.dwarf.die import DIE

from fentry_build import jinja
from fentry_build.binary.dwarf import DWARF_ERRORS, ProgramDwarf, attribute, die_name, origin_chain
from fentry_build.binary.elf import FunctionInfo
from fentry_build.binary.program import Program
from fentry_build.build import patchlist
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CLONE_FIX, CopyFinder, describe
from fentry_build.generator.resolve import (
    AmbiguousFunction, FunctionIndex, NoSuchFunction, NotInFile, NotInstrumented,
)

TEMPLATE = "new_patch.c.j2"
PATCH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
REPLACEMENT_SUFFIX = "_fixed"
INSTRUMENT_FIX = "compile its source with dependency('fentry') / -pg -mfentry"

QUALIFIERS = {
    "DW_TAG_const_type": "const",
    "DW_TAG_volatile_type": "volatile",
    "DW_TAG_restrict_type": "restrict",
    "DW_TAG_atomic_type": "_Atomic",
}
TAG_KEYWORDS = {
    "DW_TAG_structure_type": "struct",
    "DW_TAG_union_type": "union",
    "DW_TAG_enumeration_type": "enum",
}
NAMED_TYPE_TAGS = frozenset({"DW_TAG_typedef", *TAG_KEYWORDS})

# GCC's DWARF names of base types, spelled as C programs usually spell them (or must).
BASE_TYPE_SPELLINGS = {
    "short int": "short",
    "short unsigned int": "unsigned short",
    "long int": "long",
    "long unsigned int": "unsigned long",
    "long long int": "long long",
    "long long unsigned int": "unsigned long long",
    "__int128 unsigned": "unsigned __int128",
    "complex float": "_Complex float",
    "complex double": "_Complex double",
    "complex long double": "_Complex long double",
}

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


# ---- C declarators from DWARF types -----------------------------------------------------------


class CTypeWriter:
    """Writes C declarations of DWARF types, inside out as C's declarator syntax demands.

    Every typedef, struct, union and enum it names is remembered in `named` (in the order
    first met), and in `complete` when the declaration needs its whole definition (used
    by value, not through a pointer), so that the skeleton can include or repeat them.
    """

    def __init__(self) -> None:
        self.named: dict[int, DIE] = {}
        self.complete: set[int] = set()
        self.builtin_includes: dict[str, list[str]] = {}  # header -> types (va_list)

    def declare(self, t: DIE | None, inner: str = "", *, by_value: bool = True) -> str:
        """`inner` (a name, or more declarator around one) declared with type `t` (None: void)."""
        if t is None:
            return _join("void", inner)
        tag = t.tag
        if tag in QUALIFIERS:
            quals, target = _qualifiers(t)
            if target is not None and target.tag == "DW_TAG_pointer_type":
                return self.declare(target, _join(quals, inner), by_value=by_value)  # char *const p
            return quals + " " + self.declare(target, inner, by_value=by_value)     # const char *p
        if tag == "DW_TAG_pointer_type":
            target = _type_of(t)
            if target is not None and die_name(target) == VA_LIST_TAG:
                # A va_list parameter: the array type decayed to a pointer to its element.
                self.builtin_includes.setdefault("<stdarg.h>", ["va_list"])
                return _join("va_list", inner)
            inner = "*" + inner
            if target is not None and target.tag in ("DW_TAG_array_type", "DW_TAG_subroutine_type"):
                inner = f"({inner})"
            return self.declare(target, inner, by_value=False)
        if tag == "DW_TAG_array_type":
            return self.declare(_type_of(t), inner + "".join(_dimensions(t)), by_value=by_value)
        if tag == "DW_TAG_subroutine_type":
            return self.declare(_type_of(t), f"{inner}({self.parameter_types(t)})", by_value=False)
        return _join(self._name(t, by_value), inner)

    def _name(self, t: DIE, by_value: bool) -> str:
        tag, name = t.tag, die_name(t)
        if tag == "DW_TAG_base_type":
            return BASE_TYPE_SPELLINGS.get(name or "", name or "int")
        if tag == "DW_TAG_unspecified_type":
            return "void"
        if tag in NAMED_TYPE_TAGS and name:
            self.named.setdefault(t.offset, t)
            if by_value:
                self.complete.add(t.offset)
            return name if tag == "DW_TAG_typedef" else f"{TAG_KEYWORDS[tag]} {name}"
        if tag in TAG_KEYWORDS:
            return f"void /* an anonymous {TAG_KEYWORDS[tag]}: name it in the program */"
        return f"void /* {tag} */"

    def parameter_types(self, t: DIE) -> str:
        """The parameter list of a function type or function, types only: `int, const char *`."""
        params = parameters(t)
        types = [self.declare(_type_of(p)) for p in params.dies]
        if params.variadic:
            types.append("...")
        return ", ".join(types) if types else ("void" if params.prototyped else "")

    def record_definition(self, t: DIE) -> str:
        """`struct X { ... };` from the DWARF of a struct or union (members, bit-fields)."""
        return f"{self._record_body(t, 0)};"

    def _record_body(self, t: DIE, depth: int) -> str:
        keyword = TAG_KEYWORDS[str(t.tag)]
        name = die_name(t)
        pad = "\t" * (depth + 1)
        lines = []
        for m in t.iter_children():
            if m.tag != "DW_TAG_member":
                continue
            mtype = _type_of(m)
            mname = die_name(m) or ""
            if mtype is not None and mtype.tag in TAG_KEYWORDS and not die_name(mtype):
                decl = _join(self._record_body(mtype, depth + 1), mname)  # anonymous member
            else:
                decl = self.declare(mtype, mname)
            bits = m.attributes.get("DW_AT_bit_size")
            lines.append(f"{pad}{decl}{f' : {bits.value}' if bits is not None else ''};")
        head = f"{keyword} {name}" if name else keyword
        return head + " {\n" + "\n".join(lines) + "\n" + "\t" * depth + "}"


VA_LIST_TAG = "__va_list_tag"
QUALIFIER_ORDER = ("const", "volatile", "restrict", "_Atomic")


def _qualifiers(t: DIE) -> tuple[str, DIE | None]:
    """The run of qualifiers starting at t, in the usual order, and the type they qualify."""
    found: set[str] = set()
    target: DIE | None = t
    while target is not None and target.tag in QUALIFIERS:
        found.add(QUALIFIERS[target.tag])
        target = _type_of(target)
    return " ".join(q for q in QUALIFIER_ORDER if q in found), target


def _join(base: str, inner: str) -> str:
    if not inner:
        return base
    return base + inner if inner.startswith("[") else f"{base} {inner}"


def _type_of(die: DIE) -> DIE | None:
    """The DIE that die's DW_AT_type names (None: void), through its origin chain."""
    for d in origin_chain(die):
        if "DW_AT_type" in d.attributes:
            return d.get_DIE_from_attribute("DW_AT_type")
    return None


def _dimensions(array: DIE) -> Iterator[str]:
    for sub in array.iter_children():
        if sub.tag != "DW_TAG_subrange_type":
            continue
        count = sub.attributes.get("DW_AT_count")
        upper = sub.attributes.get("DW_AT_upper_bound")
        if count is not None and isinstance(count.value, int):
            yield f"[{count.value}]"
        elif upper is not None and isinstance(upper.value, int):
            yield f"[{upper.value + 1}]"
        else:
            yield "[]"


@dataclass
class Parameters:
    dies: list[DIE] = field(default_factory=list)
    variadic: bool = False
    prototyped: bool = False


def parameters(die: DIE) -> Parameters:
    """The formal parameters of a function or function type: the first DIE of its origin
    chain that lists them (a concrete body, its abstract instance, its declaration)."""
    found = Parameters(prototyped=bool(attribute(die, "DW_AT_prototyped")))
    for d in origin_chain(die):
        children = list(d.iter_children())
        dies = [c for c in children if c.tag == "DW_TAG_formal_parameter"]
        variadic = any(c.tag == "DW_TAG_unspecified_parameters" for c in children)
        if dies or variadic:
            found.dies, found.variadic = dies, variadic
            return found
    return found


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
            target = self._writer.declare(_type_of(t), die_name(t) or "", by_value=by_value)
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


# ---- the prototype --------------------------------------------------------------------------


@dataclass(frozen=True)
class Prototype:
    """F's prototype, ready for the template."""

    function: str
    replacement: str
    signature: str        # the replacement's declarator: `int compute_fixed(int x)`
    pointer_type: str     # `int (*)(int)`, for FENTRY_ORIGINAL
    pointer_decl: str     # `int (*orig)(int)`
    call: str             # `orig(x)`
    returns_void: bool
    variadic: bool


def _parameter_names(params: list[DIE]) -> list[str]:
    names: list[str] = []
    for i, p in enumerate(params, 1):
        name = die_name(p) or f"arg{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def prototype_of(die: DIE, function: str, writer: CTypeWriter) -> Prototype:
    """The prototype of the function whose DW_TAG_subprogram (concrete or abstract) is `die`."""
    params = parameters(die)
    names = _parameter_names(params.dies)
    decls = [writer.declare(_type_of(p), n) for p, n in zip(params.dies, names)]
    if params.variadic:
        decls.append("...")
    param_list = ", ".join(decls) if decls else "void"
    types = writer.parameter_types(die) or "void"
    ret = _type_of(die)
    replacement = function + REPLACEMENT_SUFFIX
    local = "orig"
    while local in names:
        local += "_"
    return Prototype(
        function=function, replacement=replacement,
        signature=writer.declare(ret, f"{replacement}({param_list})"),
        pointer_type=writer.declare(ret, f"(*)({types})"),
        pointer_decl=writer.declare(ret, f"(*{local})({types})"),
        call=f"{local}({', '.join(names)})",
        returns_void=ret is None, variadic=params.variadic,
    )


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


__all__ = ["CTypeWriter", "NewPatchResult", "Prototype", "format_result",
           "new_patch", "prototype_of"]
