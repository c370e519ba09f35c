"""binary/ipaclones.py - GCC's -fdump-ipa-clones files of a build: which callers GCC inlined a function into.

DWARF records an inlined copy as a DW_TAG_inlined_subroutine - unless the copy left no code
of its own (its result folded into a constant): then the function's abstract instance says
DW_AT_inline (inlined) and nothing says where.  The instrumentation flags (build/flags.py)
include -fdump-ipa-clones, so gcc 12 writes, beside each object `<obj>.o` compiled from
`<src>.c`, the file `<obj>.c.000i.ipa-clones` with lines such as

    Callgraph clone;scale;22;../src/f.c;11;12;limit;24;../src/f.c;17;40;inlining to

(the function: name, order, file as given to gcc, line, column; the function it was inlined
into, the same five; the reason).  A dump is the log of one compilation, so it is tied to the
linked program before it is believed (`callers_in_build`): it is the dump of a unit of the
binary's own DWARF (found through the unit's compile folder: compile_commands.json there,
else the object beside its source), it was written no later than the binary, and it
describes the very function DWARF describes (same name, file, line and column).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DUMP_SUFFIX = ".000i.ipa-clones"
DUMP_FLAG = "-fdump-ipa-clones"
INLINING = "inlining to"


@dataclass(frozen=True)
class Decision:
    """One decision of a dump about `function` (declared at file:line:column): `reason`
    "inlining to" (inlined into `into`), or a clone's ("constprop", "part": `into` is the clone)."""

    function: str
    file: str
    line: int
    column: int
    into: str
    reason: str


def read_dump(path: Path) -> list[Decision]:
    """The decisions of one dump ("Callgraph clone;..." lines)."""
    found: list[Decision] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        fields = line.split(";")
        if len(fields) != 12 or fields[0] != "Callgraph clone":
            continue
        if fields[4].isdigit() and fields[5].isdigit():
            found.append(Decision(fields[1], fields[3], int(fields[4]), int(fields[5]), fields[6],
                                  fields[11]))
    return found


def dump_of_object(obj: str, source: str) -> str:
    """Where gcc 12 -fdump-ipa-clones writes the dump of `source` compiled with -o `obj`."""
    stem, _ = posixpath.splitext(obj)
    return stem + posixpath.splitext(source)[1] + DUMP_SUFFIX


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def dumps_of_unit(comp_dir: str, source: str) -> Iterator[Path]:
    """The dump files that may belong to the unit compiled in `comp_dir` from `source`:
    from comp_dir's compile_commands.json (Meson), then beside the source (an object
    compiled next to its source, as SCons does by default)."""
    path = posixpath.join(comp_dir, source)
    try:
        entries = json.loads(Path(comp_dir, "compile_commands.json").read_text())
    except (OSError, ValueError):
        entries = []
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("file", "output")):
            continue
        directory = str(e.get("directory", comp_dir))
        if _same_path(posixpath.join(directory, e["file"]), path):
            yield Path(posixpath.join(directory, dump_of_object(e["output"], e["file"])))
    yield Path(path + DUMP_SUFFIX)


def callers_in_build(function: str, decl_file: str, line: int, column: int, comp_dir: str,
                     source: str, binary: Path) -> list[str] | None:
    """The functions GCC inlined `function` (declared at decl_file:line:column) into, and
    those it inlined them into in turn, by the dump of the unit compiled in `comp_dir` from
    `source`; [] when that dump says GCC inlined it nowhere (a function with a clone); None
    when no dump of that unit is tied to `binary` (none, newer, or not naming the function
    at that place)."""
    try:
        built = binary.stat().st_mtime
    except OSError:
        return None
    for dump in dumps_of_unit(comp_dir, source):
        try:
            if dump.stat().st_mtime > built:
                continue  # written after the binary was linked: another build's
        except OSError:
            continue
        decisions = read_dump(dump)
        if not any(d.function == function and (d.line, d.column) == (line, column)
                   and _same_path(posixpath.join(comp_dir, d.file), decl_file) for d in decisions):
            continue
        callers: list[str] = []
        todo = [function]
        while todo:
            name = todo.pop()
            for d in decisions:
                if d.function == name and d.reason == INLINING and d.into != function \
                        and d.into not in callers:
                    callers.append(d.into)
                    todo.append(d.into)
        return callers
    return None


__all__ = ["DUMP_FLAG", "DUMP_SUFFIX", "Decision", "callers_in_build", "dump_of_object",
           "dumps_of_unit", "read_dump"]
