"""fleet/command.py - the command line's multi-process verbs: apply, revert, unload, list and
status over many processes, ps, install and uninstall.  Each prints its report and returns
the exit status (fleet/multi.py: 0 all, 3 some, 1 none)."""

from __future__ import annotations

import json
import os
import sys

from fentry_build.client import control
from fentry_build.errors import FentryError
from fentry_build.fleet import targets
from fentry_build.fleet.targets import Selection

# A command aimed at one process (--pid PID) imports only the client of that process:
# the fleet's modules (threads, patch files, the patch directory) are imported where a
# command needs them, and neither typing nor pathlib (fentry_build/record.py), so that
# `fentry-build status --pid PID` starts fast (benchmarks/scaling/rows_cli.py measures it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

    from fentry_build.fleet import patchdir

    Reply = dict[str, Any]


def _short(sha: object) -> str:
    return str(sha)[:12] if sha else "?"


def format_apply(reply: Reply) -> str:
    name = reply.get("name")
    if reply.get("dry_run"):
        return (f"would apply {name} (version {_short(reply.get('sha256'))})" if reply.get("changed")
                else f"{name} is already applied (version {_short(reply.get('sha256'))}): nothing to do")
    if reply.get("changed") is False:
        return f"{name} is already applied (version {_short(reply.get('sha256'))}): nothing changed"
    return control.format_apply(reply)


def format_revert(reply: Reply) -> str:
    name = reply.get("name")
    if reply.get("dry_run"):
        return f"would revert {name}" if reply.get("changed") else f"{name} is not applied: nothing to do"
    if reply.get("changed") is False:
        return f"{name} is not applied: nothing changed"
    return control.format_revert(reply)


def _each(pids: list[int], op: Callable[[int], Reply], fmt: Callable[[Reply], str], verb: str,
          as_json: bool) -> int:
    """`op` in each process (fleet/multi.py, imported here: one-process commands never need
    it), one line each, the summary, the exit status."""
    from fentry_build.fleet import multi

    outcomes = multi.run_each(pids, op)
    print(multi.report(outcomes, fmt, as_json=as_json), flush=True)
    line = multi.summary(outcomes, verb)
    if line:
        print(f"fentry-build: {line}", file=sys.stderr)
    return multi.exit_status(outcomes)


def _print_single(reply: Reply, fmt: Callable[[Reply], str], as_json: bool) -> int:
    print(json.dumps(reply, sort_keys=True) if as_json else fmt(reply))
    return 0


# ---- apply, revert, unload, list, status --------------------------------------------------


def _apply_one(pid: int, patch: str, timeout: float) -> Reply:
    """One process, as apply always did: a patch of another build is refused with the
    command that builds it for the running one (client/advice.py), when it can be told."""
    from fentry_build.client.protocol import ProcessRefused

    try:
        return control.apply(pid, patch, timeout=timeout)
    except ProcessRefused as e:
        if e.code != "wrong_build":
            raise
        from pathlib import Path

        from fentry_build.client import advice

        command = advice.rebuild_command(pid, Path(patch))
        if command is None:
            raise
        raise FentryError(f"{e}; to build it for the running one and apply it: {command}") from None


def apply(sel: Selection, patch_file: str, *, as_json: bool, dry_run: bool, timeout: float) -> int:
    targets.check(sel, patch_build=True)
    if sel.single and not dry_run:  # as it always was
        return _print_single(_apply_one(sel.pids[0], patch_file, timeout), format_apply, as_json)
    from pathlib import Path

    from fentry_build.binary.patchinfo import read_patch
    from fentry_build.fleet import ops

    patch = Path(patch_file)
    info = read_patch(patch)  # a file that is no patch is refused before any process is asked
    pids = targets.choose(sel, patch_build=info.build_id)
    if sel.single:
        return _print_single(ops.apply(pids[0], patch, info, dry_run=dry_run, timeout=timeout),
                             format_apply, as_json)
    return _each(pids, lambda pid: ops.apply(pid, patch, info, dry_run=dry_run, timeout=timeout),
                 format_apply, "apply", as_json)


def _by_patch_file(sel: Selection, name: str) -> tuple[str, str | None]:
    """revert/unload --all PATCH.so (no --program, --build-id): the patch's name, and its
    build as the processes to ask."""
    if sel.all and not (sel.program or sel.build_id) and name.endswith(".so") and os.path.isfile(name):
        from pathlib import Path

        from fentry_build.binary.patchinfo import read_patch

        info = read_patch(Path(name))
        return info.name, info.build_id
    return name, None


def revert(sel: Selection, name: str, *, as_json: bool, if_applied: bool, dry_run: bool,
           timeout: float) -> int:
    name, build = _by_patch_file(sel, name)
    targets.check(sel, patch_build=build is not None)

    def op(pid: int) -> Reply:
        from fentry_build.fleet import ops

        return ops.revert(pid, name, if_applied=if_applied, dry_run=dry_run, timeout=timeout)

    if sel.single:
        if not (if_applied or dry_run):
            return _print_single(control.revert(sel.pids[0], name, timeout=timeout), format_revert,
                                 as_json)
        return _print_single(op(sel.pids[0]), format_revert, as_json)
    return _each(targets.choose(sel, patch_build=build), op, format_revert, "revert", as_json)


def unload(sel: Selection, name: str, *, as_json: bool, timeout: float) -> int:
    name, build = _by_patch_file(sel, name)
    targets.check(sel, patch_build=build is not None)
    if sel.single:
        return _print_single(control.unload(sel.pids[0], name, timeout=timeout),
                             control.format_unload, as_json)
    from fentry_build.fleet import ops

    return _each(targets.choose(sel, patch_build=build), lambda pid: ops.unload(pid, name, timeout=timeout),
                 control.format_unload, "unload", as_json)


def list_patches(sel: Selection, *, history: bool, as_json: bool, timeout: float) -> int:
    targets.check(sel)
    fetch = control.history if history else control.list_patches
    fmt = control.format_history if history else control.format_list
    if sel.single:
        return _print_single(fetch(sel.pids[0], timeout=timeout), fmt, as_json)
    return _each(targets.choose(sel), lambda pid: dict(fetch(pid, timeout=timeout)), fmt, "list",
                 as_json)


def status(sel: Selection, *, as_json: bool, timeout: float) -> int:
    targets.check(sel)
    if sel.single:
        return _print_single(control.status(sel.pids[0], timeout=timeout), control.format_status, as_json)
    from fentry_build.fleet import ops

    return _each(targets.choose(sel), lambda pid: ops.status(pid, timeout=timeout),
                 control.format_status, "status", as_json)


# ---- ps -------------------------------------------------------------------------------------


def ps(*, program: str | None, build_id: str | None, missing: Path | None, as_json: bool,
       timeout: float) -> int:
    """Exit status 0; with --missing, 1 when some process of that build lacks the version."""
    from fentry_build.binary.patchinfo import read_patch
    from fentry_build.fleet import ps as ps_mod

    info = read_patch(missing) if missing is not None else None
    wanted = targets.check_build_id(build_id) if build_id else None
    rows = ps_mod.ps(program=program, build_id=wanted, missing=info, timeout=timeout)
    if as_json:
        if rows:
            print(ps_mod.format_json(rows))
    elif info is not None and not rows:
        print(f"every process running build {info.build_id} that you may see has {info.name} "
              f"version {_short(info.sha256)} in effect")
    elif rows:
        print(ps_mod.format_rows(rows))
    else:
        print("no process with the fentry shim (that you may see)"
              + (" matches" if program or wanted else ""))
    return 1 if info is not None and rows else 0


# ---- install, uninstall ---------------------------------------------------------------------


def _format_installed(done: patchdir.Installed, dry_run: bool) -> str:
    name, build = done.info.name, done.info.build_id
    if not done.changed:
        return (f"{name} version {_short(done.info.sha256)} is installed already for build "
                f"{build}: nothing {'to do' if dry_run else 'changed'}")
    verb = "would install" if dry_run else "installed"
    replacing = f", replacing version {_short(done.previous)}" if done.previous else ""
    return f"{verb} {name} version {_short(done.info.sha256)} for build {build} as {done.path}{replacing}"


def _running(build_ids: list[str]) -> list[int]:
    from fentry_build.fleet import discover

    pids: set[int] = set()
    cache = discover.ElfCache()
    for b in build_ids:
        pids.update(f.pid for f in discover.scan(build_id=b, cache=cache))
    return sorted(pids)


def install(patch: Path, *, apply_now: bool, as_json: bool, dry_run: bool, timeout: float) -> int:
    from fentry_build.fleet import ops, patchdir

    done = patchdir.install(patch, dry_run=dry_run)
    print(json.dumps({"op": "install", "ok": True, "dry_run": dry_run, **done.as_json()}, sort_keys=True)
          if as_json else _format_installed(done, dry_run), flush=True)
    if not apply_now:
        return 0
    pids = _running([done.info.build_id])
    if not pids:
        if not as_json:
            print(f"no running process of build {done.info.build_id} (that you may see): processes "
                  "started from now on load it")
        return 0
    # The running processes get the installed file itself: the same bytes, the same version.
    source = patch if dry_run else done.path
    info = done.info
    return _each(pids, lambda pid: ops.apply(pid, source, info, dry_run=dry_run, timeout=timeout),
                 format_apply, "apply", as_json)


def uninstall(name: str, *, build_id: str | None, revert_now: bool, if_installed: bool, as_json: bool,
              dry_run: bool, timeout: float) -> int:
    from fentry_build.fleet import ops, patchdir

    wanted = targets.check_build_id(build_id) if build_id else None
    removed = patchdir.uninstall(name, build_id=wanted, if_installed=if_installed, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    if as_json:
        print(json.dumps({"op": "uninstall", "ok": True, "dry_run": dry_run, "changed": bool(removed),
                          "removed": [r.as_json() for r in removed]}, sort_keys=True), flush=True)
    elif removed:
        print("\n".join(f"{verb} {r.path}" for r in removed), flush=True)
    else:
        print(f"{patchdir.file_name_of(name)} is not installed: nothing {'to do' if dry_run else 'changed'}",
              flush=True)
    if not revert_now:
        return 0
    builds = sorted({r.build_id for r in removed} | ({wanted} if wanted else set()))
    pids = _running(builds)
    if not pids:
        return 0
    patch = patchdir.file_name_of(name)[:-3]
    return _each(pids, lambda pid: ops.revert(pid, patch, if_applied=True, dry_run=dry_run,
                                              timeout=timeout),
                 format_revert, "revert", as_json)


__all__ = ["apply", "format_apply", "format_revert", "install", "list_patches", "ps", "revert", "status",
           "uninstall", "unload"]
