"""generator/main.py - the patch generator: checks a patch against the built program and writes its registration C source.

``python -m fentry_build.gen`` runs main() here.  The way down: the built program is opened
once (binary.program.Program), the patch source scanned (patchsrc), each FENTRY_REPLACE and
FENTRY_REF resolved (resolve), copies a patch would miss looked for (inline), and the
registration rendered (render).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fentry_build.atomic import write_atomically
from fentry_build.binary.elf import BinaryInfo
from fentry_build.binary.program import Program
from fentry_build.binary.store import resolve_target
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CopyFinder, describe, no_dwarf_note
from fentry_build.generator.patchsrc import PatchSource, parse_patch
from fentry_build.generator.render import render
from fentry_build.generator.resolve import ResolvedReplacement, resolve_patch, resolve_refs

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


def generate(binary: Path, patch: Path, warn: Warn | None = None, *, strict: bool = False) -> str:
    """The registration source for the patch source `patch` against the built `binary`.

    Raises FentryError (one line naming the function and the fix) for anything the
    build can catch.  Code the patch does not reach (inlined copies, IPA clones of a
    replaced function) and a program without DWARF are warnings, one line per function,
    sent to `warn` (default: stderr) - or, with `strict`, the first is a FentryError.
    """
    with Program.open(binary) as program:
        return generate_for(program, patch, warn, strict=strict)


def generate_for(program: Program, patch: Path, warn: Warn | None = None, *,
                 strict: bool = False) -> str:
    """generate() for a program that is open already (its build-id is checked here, once)."""
    info = program.info
    build_id = check_build_id(info)
    source = parse_patch(patch)
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
        (warn or _stderr_warning)(line)
    return render(info, build_id, source, resolved, refs)


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
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) where the generator would warn: inlined copies or IPA clones "
                        f"of a replaced function, no DWARF to check for them (also: {STRICT_ENV}=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        binary = resolve_target(args.binary, args.target, args.build_id, args.store)
        text = generate(binary, args.patch, strict=args.strict or strict_from_environment())
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
