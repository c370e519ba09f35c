"""fleet/targets.py - which processes a command is for: ``--pid`` (repeated), or ``--all``
with ``--program PATH`` / ``--build-id ID`` (or, for a patch, the build it is for)."""

from __future__ import annotations

import re

from fentry_build.errors import FentryError
from fentry_build.record import Record

_HEX = re.compile(r"[0-9a-f]{2,128}")


class NothingMatched(FentryError):
    """``--all`` found no process: nothing was done (exit status 1, said in one line)."""


def check_build_id(text: str) -> str:
    """A build-id as given on the command line, lower-case hex; one-line error otherwise."""
    value = text.strip().lower()
    if not _HEX.fullmatch(value) or len(value) % 2:
        raise FentryError(f"--build-id {text!r} is not a build-id (hex digits, as fentry-build "
                          "check or ps prints them)")
    return value


class Selection(Record):
    """What the command line asked for."""

    __slots__ = ("pids", "all", "program", "build_id")

    def __init__(self, pids: tuple[int, ...] = (), all: bool = False, program: str | None = None,
                 build_id: str | None = None) -> None:
        self.pids = pids
        self.all = all
        self.program = program
        self.build_id = build_id

    @property
    def single(self) -> bool:
        """Exactly one --pid: the command behaves and prints as it always did."""
        return len(self.pids) == 1 and not self.all

    def describe(self, build_id: str | None = None) -> str:
        parts = []
        if self.program:
            parts.append(f"of program {self.program}")
        if self.build_id or build_id:
            parts.append(f"running build {self.build_id or build_id}")
        return " ".join(parts)


def check(sel: Selection, *, patch_build: bool = False) -> None:
    """Refuse a selection that says too little or too much (one line naming the fix)."""
    if sel.build_id is not None:
        check_build_id(sel.build_id)
    if sel.all and sel.pids:
        raise FentryError("give either --pid (one or more) or --all, not both")
    if not sel.all and (sel.program or sel.build_id):
        raise FentryError("--program and --build-id choose processes with --all; add --all")
    if not sel.all and not sel.pids:
        raise FentryError("say which processes: --pid PID (repeat it for several), or --all with "
                          "--program PATH or --build-id ID (fentry-build ps lists them)")
    if sel.all and not (sel.program or sel.build_id or patch_build):
        raise FentryError("--all needs --program PATH or --build-id ID (fentry-build ps lists "
                          "every process with the shim)")


def choose(sel: Selection, *, patch_build: str | None = None) -> list[int]:
    """The pids `sel` names, in order, each once.  With --all, the processes carrying the
    shim that match; NothingMatched when none does."""
    check(sel, patch_build=patch_build is not None)
    if not sel.all:
        return list(dict.fromkeys(sel.pids))
    from fentry_build.fleet import discover  # reads ELF files: only for --all

    build_id = sel.build_id or (None if sel.program else patch_build)
    found = discover.scan(program=sel.program, build_id=build_id)
    if not found:
        what = Selection(all=True, program=sel.program, build_id=build_id).describe()
        raise NothingMatched(f"no running process {what} carries the fentry shim (that you may "
                             "see): nothing done")
    return [f.pid for f in found]


__all__ = ["NothingMatched", "Selection", "check", "check_build_id", "choose"]
