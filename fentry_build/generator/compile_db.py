"""compile_db.py - compile_commands.json, and the compile lines made from one of its entries.

Meson writes compile_commands.json in its build folder; SCons writes one with
env.Tool('compilation_db').  Each entry is the exact compile line of one translation
unit.  The patch generator recompiles a unit with that line in two source trees (the
original and the fixed), so every path that points into the project's source tree is
moved to the same place in the other tree; paths into the build folder (generated
headers) and outside the project (system headers) stay where they are.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fentry_build.errors import FentryError

DB_NAME = "compile_commands.json"
SECTION_FLAGS = ("-ffunction-sections", "-fdata-sections")

# Options whose value is a path, given joined (-Ifoo) or as the next argument (-I foo).
PATH_OPTIONS = ("-I", "-isystem", "-iquote", "-idirafter", "-include", "-imacros")
# Options about where the output goes: the generator chooses its own.
DROP_WITH_VALUE = frozenset({"-o", "-MF", "-MT", "-MQ"})
DROP = frozenset({"-c", "-MD", "-MMD", "-M", "-MM", "-MP", "-MG", "-E", "-S", "-pipe"})
# What libclang needs of a compile line to see the same code: the preprocessor's view
# and the language; code generation options mean nothing to it.
CLANG_PREFIXES = ("-D", "-U", "-std=", "-O", "-ansi", "-pthread", "-funsigned-char",
                  "-fsigned-char", "-fno-signed-char", "-fno-unsigned-char", "-fgnu89-inline",
                  "-m64", "-m32")


def normal(path: str, base: str | Path) -> Path:
    """`path` (relative to `base` when not absolute) with `.` and `..` resolved lexically."""
    return Path(posixpath.normpath(posixpath.join(str(base), path)))


@dataclass(frozen=True)
class CompileEntry:
    """One translation unit of the compile database."""

    directory: Path            # where the compiler runs
    file: Path                 # the source file, absolute
    arguments: tuple[str, ...]  # the compile line, argv[0] the compiler

    @property
    def compiler(self) -> str:
        return self.arguments[0]


class PathMover:
    """Moves paths of the project's source tree to the same place in another tree."""

    def __init__(self, project: Path, tree: Path, keep: Iterable[Path] = ()) -> None:
        self.project = project
        self.tree = tree
        # Folders of the project that stay (build folders) - never the project itself or a
        # folder above it: SCons builds in the source tree, whose sources must move.
        self._keep = tuple(k for k in keep if k != project and not project.is_relative_to(k))

    def move(self, path: Path) -> Path:
        if self.tree == self.project or not path.is_relative_to(self.project):
            return path
        if any(path.is_relative_to(k) for k in self._keep):
            return path
        return self.tree / path.relative_to(self.project)

    def back(self, path: Path) -> Path:
        """The project's path for a path of this tree (the inverse of move)."""
        if self.tree != self.project and path.is_relative_to(self.tree):
            return self.project / path.relative_to(self.tree)
        return path


def _split_path_option(arg: str) -> tuple[str, str | None]:
    """('-I', 'dir') for -Idir, ('-I', None) for a bare -I (value in the next argument)."""
    for opt in PATH_OPTIONS:
        if arg == opt:
            return opt, None
        if arg.startswith(opt) and opt == "-I":
            return opt, arg[len(opt):]
    return "", None


class CompileLine:
    """Compile lines derived from one entry, with its paths moved into one source tree."""

    def __init__(self, entry: CompileEntry, mover: PathMover) -> None:
        self.entry = entry
        self.mover = mover

    @property
    def source(self) -> Path:
        return self.mover.move(self.entry.file)

    def _path(self, value: str) -> str:
        return str(self.mover.move(normal(value, self.entry.directory)))

    def options(self) -> list[str]:
        """The entry's options without output options and the source, paths moved and absolute."""
        out: list[str] = []
        args = list(self.entry.arguments[1:])
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in DROP_WITH_VALUE:
                i += 2
                continue
            if arg in DROP or arg.startswith("-fdiagnostics-color"):
                i += 1
                continue
            opt, joined = _split_path_option(arg)
            if opt and joined is None and i + 1 < len(args):
                out += [opt, self._path(args[i + 1])]
                i += 2
                continue
            if opt and joined is not None:
                out.append(opt + self._path(joined))
            elif not arg.startswith("-") and normal(arg, self.entry.directory) == self.entry.file:
                pass  # the source: callers add it where they want it
            else:
                out.append(arg)
            i += 1
        return out

    def object_command(self, output: Path) -> list[str]:
        """Compile to `output` with one section per function and per variable."""
        return [self.entry.compiler, *self.options(), *SECTION_FLAGS, "-c", str(self.source),
                "-o", str(output)]

    def depend_command(self, depfile: Path) -> list[str]:
        """Preprocess only, writing the files the unit includes as a make rule to `depfile`."""
        return [self.entry.compiler, *self.options(), "-M", "-MF", str(depfile), str(self.source)]

    def clang_arguments(self, builtin_include: Path) -> list[str]:
        """What libclang needs to parse the unit as gcc does: includes, macros, language."""
        out: list[str] = []
        opts = self.options()
        i = 0
        while i < len(opts):
            arg = opts[i]
            opt, joined = _split_path_option(arg)
            if opt and joined is None and i + 1 < len(opts):
                out += [opt, opts[i + 1]]
                i += 2
                continue
            if opt or arg.startswith(CLANG_PREFIXES):
                out.append(arg)
            i += 1
        # libclang's wheel has no headers of its own (stddef.h, stdarg.h): use gcc's.
        return [*out, "-isystem", str(builtin_include), "-Wno-unknown-attributes"]


def _entry(raw: object, db: Path) -> CompileEntry:
    if not isinstance(raw, dict) or "directory" not in raw or "file" not in raw:
        raise FentryError(f"{db}: an entry without directory and file; regenerate it with your build")
    directory = Path(str(raw["directory"]))
    if "arguments" in raw and isinstance(raw["arguments"], list):
        arguments = tuple(str(a) for a in raw["arguments"])
    elif "command" in raw:
        arguments = tuple(shlex.split(str(raw["command"])))
    else:
        raise FentryError(f"{db}: an entry for {raw['file']} has neither command nor arguments")
    if not arguments:
        raise FentryError(f"{db}: the entry for {raw['file']} has an empty command")
    return CompileEntry(directory, normal(str(raw["file"]), directory), arguments)


def load(db: Path) -> list[CompileEntry]:
    """The C entries of compile_commands.json at `db`."""
    try:
        raw = json.loads(db.read_text(encoding="utf-8"))
    except OSError as e:
        raise FentryError(f"cannot read {db}: {e.strerror or e}; build the program with Meson "
                          "(it writes the file) or SCons with env.Tool('compilation_db')") from None
    except json.JSONDecodeError as e:
        raise FentryError(f"{db} is not JSON ({e}); regenerate it with your build") from None
    if not isinstance(raw, list):
        raise FentryError(f"{db} is not a list of compile commands; regenerate it with your build")
    return [e for e in (_entry(r, db) for r in raw) if e.file.suffix == ".c"]


def find_database(build_dir: Path | None, binary: Path) -> Path:
    """compile_commands.json in `build_dir`, or beside the binary and in the folders above it."""
    if build_dir is not None:
        db = build_dir / DB_NAME
        if not db.is_file():
            raise FentryError(f"no {DB_NAME} in {build_dir}; pass --build-dir the folder your "
                              "build wrote it to")
        return db
    for folder in [binary.resolve().parent, *binary.resolve().parents]:
        if (folder / DB_NAME).is_file():
            return folder / DB_NAME
    raise FentryError(f"no {DB_NAME} beside {binary} or above it; pass --build-dir (Meson writes "
                      "it in its build folder; SCons with env.Tool('compilation_db'))")


def run_compiler(command: Sequence[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, errors="replace",
                          timeout=600)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip())
        raise FentryError(f"{what} failed: {first.strip() or 'exit ' + str(proc.returncode)}")


def builtin_include(compiler: str) -> Path:
    """The compiler's own header folder (stddef.h, stdarg.h), for libclang."""
    proc = subprocess.run([compiler, "-print-file-name=include"], capture_output=True, text=True,
                          timeout=60)
    path = Path(proc.stdout.strip())
    if proc.returncode != 0 or not path.is_dir():
        raise FentryError(f"{compiler} -print-file-name=include gave no folder; the generator "
                          "needs gcc's builtin headers for libclang")
    return path


def dependencies(depfile: Path, base: Path) -> list[Path]:
    """The files of a make rule written by gcc -M; relative paths are relative to `base`."""
    text = depfile.read_text(encoding="utf-8", errors="surrogateescape").replace("\\\n", " ")
    _, _, deps = text.partition(": ")
    files: list[str] = []
    current = ""
    escaped = False
    for ch in deps:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                files.append(current)
            current = ""
        else:
            current += ch
    if current:
        files.append(current)
    return [normal(f, base) for f in files]
