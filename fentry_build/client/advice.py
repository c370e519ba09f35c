"""client/advice.py - what to do when a process refuses a patch built for another build.

The shim's refusal names both build-ids; this adds the exact command that builds the patch
for the build the process runs, in the build system of the project the patch comes from
(Meson: the subproject's `target` option; SCons: `fentry_target=`), archiving the running
binary first when the store does not have it (docs/workflow.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from fentry_build.errors import FentryError
from fentry_build.layout import meson_build_dir, project_of, shown


def running_build(pid: int) -> tuple[str, str] | None:
    """(program name, build-id hex) of what process `pid` runs, read through /proc/PID/exe."""
    from fentry_build.binary.elf import program_name, read_build_id

    exe = Path(f"/proc/{pid}/exe")
    try:
        build_id = read_build_id(exe)
    except (FentryError, OSError):
        return None
    return (program_name(exe), build_id.hex()) if build_id is not None else None


def _archived(patch: Path, build_id: str) -> bool:
    from fentry_build.binary import store

    try:
        store.lookup(store.store_dir(None, patch), build_id)
        return True
    except FentryError:
        return False


def _meson_has_target_option(build_dir: Path) -> bool:
    """Does the build folder's fentry subproject have the `target` option (meson-init of this
    version or later)?"""
    try:
        options = json.loads((build_dir / "meson-info" / "intro-buildoptions.json").read_text())
    except (OSError, ValueError):
        return True  # cannot tell: say the command that works with a current subproject
    # Meson names a subproject's option "fentry:target" (older ones: "target" of subproject fentry).
    return any(o.get("name") == "fentry:target"
               or (o.get("name") == "target" and o.get("subproject") == "fentry")
               for o in options if isinstance(o, dict))


def rebuild_command(pid: int, patch: Path) -> str | None:
    """The command (one shell line) that builds `patch` again for what process `pid` runs, and
    applies it; None when the running build cannot be read."""
    running = running_build(pid)
    if running is None:
        return None
    _, build_id = running
    name = patch.name.removesuffix(".so")
    archive = "" if _archived(patch, build_id) else f"fentry-build archive /proc/{pid}/exe && "
    found = project_of(patch)
    if found is not None and found[0] == "meson" and (build_dir := meson_build_dir(patch)):
        b = shown(build_dir)
        setup = "" if _meson_has_target_option(build_dir) else \
            f"fentry-build meson-init {shown(found[1])} && "
        return (f"{setup}{archive}meson configure {b} -Dfentry:target={build_id} && "
                f"meson compile -C {b} patches && fentry-build apply --pid {pid} {shown(patch)}")
    if found is not None and found[0] == "scons":
        return (f"{archive}cd {shown(found[1])} && scons patches fentry_target={build_id} && "
                f"fentry-build apply --pid {pid} {Path(patch).resolve()}")
    return (f"in the project (with build-id {build_id} archived there: fentry-build archive "
            f"/proc/{pid}/exe), Meson: meson configure BUILDDIR -Dfentry:target={build_id} && "
            f"meson compile -C BUILDDIR patches; SCons: scons patches fentry_target={build_id}; "
            f"then fentry-build apply --pid {pid} BUILDDIR/{name}.so")


__all__ = ["rebuild_command", "running_build"]
