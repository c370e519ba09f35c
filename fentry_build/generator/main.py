"""generator/main.py - the patch generator: checks a patch against the built program and writes its registration C source.

``python -m fentry_build.gen`` runs main() here.  The way down: the built program is opened
once (binary.program.Program), the patch compiled as its build compiles it to find its
FENTRY_* uses (scan, patchsrc), each FENTRY_REPLACE and FENTRY_REF resolved (resolve),
copies a patch would miss looked for (inline), the patch's types checked by the compiler
against the program's (protocheck), and the registration rendered (render).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from fentry_build.atomic import write_atomically
from fentry_build.binary.dwarf import DWARF_ERRORS
from fentry_build.binary.elf import BinaryInfo
from fentry_build.binary.program import Program
from fentry_build.binary.store import resolve_target
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CopyFinder, describe, no_dwarf_note
from fentry_build.generator.patchsrc import PatchSource, patch_source
from fentry_build.generator.protocheck import PrototypeCheck
from fentry_build.generator.render import placements, render, render_placement
from fentry_build.generator.resolve import ResolvedReplacement, resolve_patch, resolve_refs
from fentry_build.generator.scan import PatchCompile, scan

BUILD_ID_MAX = 64  # FENTRY_BUILD_ID_MAX in shim/include/fentry.h (tests/test_facts.py)
STRICT_ENV = "FENTRY_STRICT"
STRICT_NOTE = "an error because of --strict / FENTRY_STRICT=1"

Warn = Callable[[str], None]


def code_copy_findings(binary: BinaryInfo, patch: PatchSource,
                       resolved: Sequence[ResolvedReplacement], finder: CopyFinder) -> list[str]:
    """One line per replaced function whose code also runs elsewhere (inlined copies, IPA
    clones), and once a note when the program has no DWARF to look for inlined copies."""
    replaced = {r.function.addr for r in resolved}
    program = binary.name
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


def _stderr_warning(message: str) -> None:
    print(f"fentry-gen: warning: {message}", file=sys.stderr)


def generate(binary: Path, patch: Path, warn: Warn | None = None, *, strict: bool = False,
             compile: PatchCompile | None = None, inputs: list[Path] | None = None,
             places: dict[str, int] | None = None) -> str:
    """The registration source for the patch source `patch` against the built `binary`.

    Raises FentryError (one line naming the function and the fix) for anything the
    build can catch.  Code the patch does not reach (inlined copies, IPA clones of a
    replaced function), a program without DWARF and a type that cannot be checked are
    warnings, one line each, sent to `warn` (default: stderr) - or, with `strict`, the
    first is a FentryError.  `compile` is how the patch's build compiles it (default:
    PatchCompile.find: its compile_commands.json entry, else plain gcc).  `inputs`, when
    given, receives the files the result depends on (for a depfile); `places`, when given,
    each replacement's placement (render_placement).
    """
    with Program.open(binary) as program:
        return generate_for(program, patch, warn, strict=strict, compile=compile, inputs=inputs,
                            places=places)


def generate_for(program: Program, patch: Path, warn: Warn | None = None, *,
                 strict: bool = False, compile: PatchCompile | None = None,
                 inputs: list[Path] | None = None, places: dict[str, int] | None = None) -> str:
    """generate() for a program that is open already (its build-id is checked here, once)."""
    info = program.info
    build_id = check_build_id(info)
    compile = compile or PatchCompile.find(patch)
    emit = warn or _stderr_warning
    with tempfile.TemporaryDirectory(prefix="fentry-gen-") as tmp:
        work = Path(tmp)
        scanned = scan(patch, compile, work)
        if inputs is not None:
            inputs += [program.path, *scanned.inputs, *([compile.database] if compile.database else [])]
        source = patch_source(patch, scanned.records, compile.file_of(compile.source))
        try:
            dwarf = program.dwarf
            finder = CopyFinder(info, dwarf)
            resolved = resolve_patch(info, source, finder=finder)
            refs = resolve_refs(info, source, dwarf, finder)
            findings = code_copy_findings(info, source, resolved, finder)
        except OSError as e:
            raise FentryError(f"cannot read {program.path}: {e.strerror or e}; pass the built program") from None
        if strict and findings:
            raise FentryError(f"{findings[0]} ({STRICT_NOTE})")
        for line in findings:
            emit(line)
        if dwarf is not None:
            check = PrototypeCheck(program, source, compile)
            try:
                check.plan(resolved, refs, dwarf)
            except DWARF_ERRORS as e:
                message = f"{patch}: cannot check the patch's types: the DWARF of {program.name} " \
                          f"cannot be read ({e})"
                if strict:
                    raise FentryError(f"{message} ({STRICT_NOTE})") from None
                emit(message)
            else:
                check.run(work, scanned.object, emit, strict)
    if places is not None:
        places.update(placements(resolved))
    return render(info, build_id, source, resolved, refs)


def depfile(output: Path, inputs: list[Path]) -> str:
    """A make rule: `output` depends on `inputs` (spaces escaped, as Ninja reads depfiles)."""
    def escaped(p: Path) -> str:
        return str(p).replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#")
    unique = list(dict.fromkeys(str(p) for p in inputs))
    return f"{escaped(output)}: " + " \\\n  ".join(escaped(Path(p)) for p in unique) + "\n"


def strict_from_environment(environ: dict[str, str] | None = None) -> bool:
    """FENTRY_STRICT=1 (or yes/true/on) turns warnings into errors without editing the command."""
    value = (os.environ if environ is None else environ).get(STRICT_ENV, "")
    return value.strip().lower() in ("1", "yes", "true", "on")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fentry_build.gen",
        description="Write the registration C source of a live patch for a built program.",
        epilog="The build the patch is for: --build-id ID (an archived build, fentry-build "
               "archive), else a non-empty --target (a build-id or a file: what Meson's "
               "-Dfentry:target= and SCons' fentry_target= pass), else --binary (the build "
               "folder's program, or /proc/PID/exe: what a process runs). See docs/workflow.md.",
    )
    p.add_argument("--binary", type=Path, help="the built program or shared library, or /proc/PID/exe")
    p.add_argument("--target", default="", help="'' (use --binary), a build-id of the store, or a file")
    p.add_argument("--build-id", help="an archived build (a build-id or a unique prefix of one)")
    p.add_argument("--store", type=Path, help="the store of archived builds (default: $FENTRY_STORE, "
                   "else .fentry/builds of the binary's project)")
    p.add_argument("--patch", required=True, type=Path, help="the patch source (.c)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the registration source to write")
    p.add_argument("--depfile", type=Path, help="also write a make rule of the files the registration "
                   "depends on (the program, the patch and its headers, compile_commands.json): "
                   "Meson's depfile:")
    p.add_argument("--place", type=Path, metavar="HEADER",
                   help="also write the placement header: -include it in the patch's compile line "
                        "and each replacement starts where its site can jump straight to it "
                        "(docs/how-it-works.md, Placement)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) where the generator would warn: inlined copies or IPA clones "
                        f"of a replaced function, no DWARF to check for them (also: {STRICT_ENV}=1)")
    p.add_argument("compile_line", nargs="*", metavar="-- CC ARGS",
                   help="after --: the compiler and options the build compiles the patch with "
                        "(default: its entry of compile_commands.json, found from -o's folder)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        binary = resolve_target(args.binary, args.target, args.build_id, args.store)
        compile = PatchCompile.find(args.patch, args.output.parent, args.compile_line or None)
        inputs: list[Path] = []
        places: dict[str, int] = {}
        if args.place is not None and not args.place.exists():
            # The patch's compile line -include's it, and the scan compiles with that line.
            write_atomically(args.place, render_placement(binary.name, args.patch.name, None))
        text = generate(binary, args.patch, strict=args.strict or strict_from_environment(),
                        compile=compile, inputs=inputs, places=places)
        write_atomically(args.output, text)
        if args.place is not None:
            write_atomically(args.place, render_placement(binary.name, args.patch.name, places))
            # Its own output is no input of the generator (Ninja would see a cycle).
            inputs = [p for p in inputs if os.path.abspath(p) != os.path.abspath(args.place)]
        if args.depfile is not None:
            write_atomically(args.depfile, depfile(args.output, inputs))
    except FentryError as e:
        print(f"fentry-gen: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"fentry-gen: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
