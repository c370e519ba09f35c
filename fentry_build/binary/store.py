"""binary/store.py - the archive of released builds: each program kept, with its DWARF, under its build-id.

A patch must be built against the build that runs, which is rarely the one in the build
folder any more: `fentry-build archive build/server` keeps a copy at release time, and the
generator finds it again by build-id (``--build-id ID``, Meson's ``-Dfentry:target=ID``,
SCons' ``fentry_target=ID``).  Layout of a store folder::

    <store>/<build-id>/<program>       the binary as built (unstripped: symbols and DWARF)
    <store>/<build-id>/build.json      program, build-id, where from, when, size, DWARF or not

An entry is written under a temporary name inside the store and renamed into place, so a
reader sees a whole entry or none; entries never change once written (a build-id names one
build).  The store is --store DIR, else $FENTRY_STORE, else <project>/.fentry/builds of the
project the binary (or the working folder) belongs to (layout.project_of).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fentry_build.errors import FentryError
from fentry_build.layout import project_of, shown

STORE_ENV = "FENTRY_STORE"
PROJECT_STORE = Path(".fentry") / "builds"
INFO = "build.json"
BUILD_ID = re.compile(r"[0-9a-f]{8,}")  # a build-id, or a unique prefix of one (8 digits or more)

Warn = Callable[[str], None]


@dataclass(frozen=True)
class ArchivedBuild:
    """One entry of a store."""

    build_id: str
    program: str
    path: Path            # the archived binary
    archived_at: float    # seconds since the epoch
    size: int
    source: str           # the file it was archived from
    has_dwarf: bool

    def as_json(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def store_dir(explicit: Path | None = None, near: Path | None = None) -> Path:
    """The store: `explicit`, else $FENTRY_STORE, else .fentry/builds of the project of `near`
    (a binary of a build) or of the working folder."""
    if explicit is not None:
        return explicit
    env = os.environ.get(STORE_ENV, "")
    if env:
        return Path(env)
    for start in ([near] if near is not None else []) + [Path.cwd()]:
        if str(start).startswith("/proc/"):
            continue  # a process's binary belongs to no project folder
        found = project_of(start)
        if found is not None:
            return found[1] / PROJECT_STORE
    raise FentryError("no project here to keep the store of released builds in (no meson.build, "
                      f"SConstruct or Meson build folder); pass --store DIR or set {STORE_ENV}")


def _read_entry(folder: Path) -> ArchivedBuild | None:
    try:
        info = json.loads((folder / INFO).read_text())
        return ArchivedBuild(str(info["build_id"]), str(info["program"]),
                             folder / str(info["program"]), float(info["archived_at"]),
                             int(info["size"]), str(info["source"]), bool(info["has_dwarf"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an entry (a temporary folder, or damaged): never used


def entries(store: Path) -> list[ArchivedBuild]:
    """The store's builds, oldest first."""
    if not store.is_dir():
        return []
    found = [e for d in store.iterdir() if d.is_dir() and BUILD_ID.fullmatch(d.name)
             and (e := _read_entry(d)) is not None and e.build_id == d.name]
    return sorted(found, key=lambda e: (e.archived_at, e.build_id))


def lookup(store: Path, build_id: str) -> ArchivedBuild:
    """The archived build with this build-id (or unique prefix of one); FentryError naming the
    store's builds otherwise."""
    wanted = build_id.strip().lower()
    if not BUILD_ID.fullmatch(wanted):
        raise FentryError(f"{build_id!r} is not a build-id (hexadecimal, at least 8 digits); "
                          "`fentry-build archive --list` shows the archived ones")
    exact = store / wanted
    if (entry := _read_entry(exact)) is not None and entry.build_id == wanted:
        return entry
    matching = [e for e in entries(store) if e.build_id.startswith(wanted)]
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise FentryError(f"build-id {wanted} is ambiguous in {shown(store)}: "
                          f"{', '.join(e.build_id for e in matching)}; give more digits")
    known = entries(store)
    listing = "; ".join(f"{e.build_id[:12]} ({e.program})" for e in known[-5:]) or "it is empty"
    raise FentryError(f"no build {wanted} in the store {shown(store)} ({listing}); archive the "
                      "running build first: fentry-build archive PROGRAM (or /proc/PID/exe)")


def archive(binary: Path, store: Path, warn: Warn) -> tuple[ArchivedBuild, bool]:
    """Copy `binary` into the store under its build-id; (the entry, whether it is new).

    FentryError for a binary without a build-id; a warning for one without DWARF (patches
    built against it cannot be checked for inlined copies or prototypes).
    """
    from fentry_build.binary.program import Program

    with Program.open(binary) as program:
        info = program.info
        if info.build_id is None:
            raise FentryError(f"{binary} has no GNU build-id, so no patch could be matched to it; "
                              "link it with -Wl,--build-id (dependency('fentry') does)")
        build_id, name, has_dwarf = info.build_id.hex(), program.name, info.has_dwarf
        if not any(f.site is not None for f in info.functions):
            warn(f"{binary} has no fentry sites: no patch can replace any of its functions "
                 "(build it with dependency('fentry'))")
    existing = _read_entry(store / build_id)
    if existing is not None:
        return existing, False
    if not has_dwarf:
        warn(f"{binary} has no DWARF (-g): patches built against the archived copy cannot be "
             "checked for inlined copies and prototypes; archive the unstripped build")
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    try:
        copy = tmp / name
        shutil.copyfile(binary, copy)  # through /proc/PID/exe too: even a deleted file
        copy.chmod(0o555)
        entry = ArchivedBuild(build_id, name, store / build_id / name, time.time(),
                              copy.stat().st_size, os.path.abspath(binary), has_dwarf)
        (tmp / INFO).write_text(json.dumps(entry.as_json(), indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, store / build_id)
        except OSError:
            raced = _read_entry(store / build_id)  # archived meanwhile by someone else
            if raced is None:
                raise
            return raced, False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry, True


def resolve_target(binary: Path | None, target: str = "", build_id: str | None = None,
                   store: Path | None = None) -> Path:
    """The file a patch is built against: the archived build `build_id`, else `target` (a
    build-id of the store or a file), else `binary` (the build folder's program)."""
    near = binary
    if build_id:
        return lookup(store_dir(store, near), build_id).path
    spec = target.strip()
    if spec:
        if BUILD_ID.fullmatch(spec.lower()) and not Path(spec).exists():
            return lookup(store_dir(store, near), spec).path
        path = Path(spec)
        if not path.exists():
            raise FentryError(f"the target {spec} is neither a file nor a build-id of the store; "
                              "pass a build-id (fentry-build archive --list) or the binary's path")
        return path
    if binary is None:
        raise FentryError("pass --binary PROGRAM (the build to patch) or --build-id ID (an "
                          "archived one)")
    return binary


def format_entry(e: ArchivedBuild) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.archived_at))
    dwarf = "" if e.has_dwarf else "  (no DWARF)"
    return f"{e.build_id}  {e.program:<16} {when}  {e.size:>10}  {shown(e.path)}{dwarf}"


__all__ = ["ArchivedBuild", "STORE_ENV", "archive", "entries", "format_entry", "lookup",
           "resolve_target", "shown", "store_dir"]
