"""``fentry-build meson-init``: put the ``fentry`` subproject into a user's Meson project."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fentry_build import __version__, paths
from fentry_build import jinja
from fentry_build.errors import FentryError

# The shim files the subproject carries: sources, headers and shim/meson.build.
_SHIM_SUFFIXES = {".c", ".h", ".S", ".build"}


@dataclass
class MesonInitResult:
    project_dir: Path
    written: list[Path] = field(default_factory=list)    # files created or changed
    unchanged: list[Path] = field(default_factory=list)  # files already up to date


@dataclass(frozen=True)
class ProjectPrograms:
    """What Meson's introspection of a configured build folder says the project builds."""

    build_dir: Path
    project: str                                  # project()'s name
    executables: list[tuple[str, list[str]]]      # (name, sources relative to the project)


def _shim_files() -> list[Path]:
    """Every file the subproject carries, relative to the shim folder (include/fentry.h, ...)."""
    shim = paths.shim_dir()
    return sorted(p.relative_to(shim) for p in shim.rglob("*")
                  if p.is_file() and p.suffix in _SHIM_SUFFIXES)


def _put_text(path: Path, text: str, result: MesonInitResult) -> None:
    if path.is_file() and path.read_text() == text:
        result.unchanged.append(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    result.written.append(path)


def _put_copy(src: Path, dest: Path, result: MesonInitResult) -> None:
    if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
        result.unchanged.append(dest)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    result.written.append(dest)


def _remove_stale(folder: Path, shipped: set[Path], result: MesonInitResult) -> None:
    """Remove what an older fentry_build left in `folder` (files, then emptied folders)."""
    for old in sorted(folder.rglob("*"), reverse=True):  # children before their folder
        rel = old.relative_to(folder)
        if (old.is_file() or old.is_symlink()) and rel not in shipped:
            old.unlink()
            result.written.append(old)
        elif old.is_dir() and not old.is_symlink() and not any(old.iterdir()):
            old.rmdir()


def meson_init(project_dir: Path) -> MesonInitResult:
    """Write ``subprojects/fentry/`` and ``subprojects/fentry.wrap``; safe to run again.

    Files of an older fentry_build are replaced; files no longer shipped are removed
    from ``subprojects/fentry/shim`` (and folders left empty) so that a stale source can
    never be built.
    """
    project_dir = project_dir.resolve()
    if not project_dir.is_dir():
        raise FentryError(f"{project_dir}: no such directory; create the project first or use "
                          "`fentry-build init DIR` to scaffold one")
    if not (project_dir / "meson.build").is_file():
        raise FentryError(f"{project_dir} has no meson.build; run meson-init in the project's "
                          "top folder, or `fentry-build init DIR` to scaffold a new project")
    result = MesonInitResult(project_dir)
    sub = project_dir / "subprojects" / "fentry"
    ctx = {"version": __version__}
    _put_text(sub / "meson.build", jinja.render("meson/subproject_meson.build.j2", ctx), result)
    _put_text(sub / "meson.options", jinja.render("meson/meson.options.j2", ctx), result)
    shipped = _shim_files()
    for rel in shipped:
        _put_copy(paths.shim_dir() / rel, sub / "shim" / rel, result)
    _remove_stale(sub / "shim", set(shipped), result)
    _put_text(project_dir / "subprojects" / "fentry.wrap",
              jinja.render("meson/fentry.wrap.j2", ctx), result)
    return result


def meson_snippet(name: str, sources: list[str], patches: dict[str, str],
                  project: str | None = None) -> str:
    """The user's meson.build for a program and its patches (the README snippet)."""
    return jinja.render("project/meson.build.j2",
                        {"name": name, "sources": sources, "patches": patches,
                         "project": project or name})


def _newest_build_dir(project_dir: Path) -> Path | None:
    """The project's most recently configured Meson build folder (one level down), if any."""
    found = [d for d in project_dir.iterdir()
             if (d / "meson-info" / "intro-targets.json").is_file()] if project_dir.is_dir() else []
    return max(found, key=lambda d: (d / "meson-info" / "intro-targets.json").stat().st_mtime,
               default=None)


def introspect(project_dir: Path) -> ProjectPrograms | None:
    """The project's name and executables, from Meson's introspection files of its newest
    build folder (meson-info/intro-*.json, what `meson introspect` prints); None without one."""
    build_dir = _newest_build_dir(project_dir)
    if build_dir is None:
        return None
    info = build_dir / "meson-info"
    try:
        targets = json.loads((info / "intro-targets.json").read_text())
        project = json.loads((info / "intro-projectinfo.json").read_text()).get("descriptive_name")
    except (OSError, ValueError):
        return None
    executables = []
    for target in targets:
        if target.get("type") != "executable" or target.get("subproject"):
            continue
        sources = [os.path.relpath(s, project_dir) for group in target.get("target_sources", [])
                   for s in group.get("sources", []) if s.endswith(".c")]
        executables.append((str(target["name"]), sources))
    if not executables:
        return None
    return ProjectPrograms(build_dir, str(project or executables[0][0]), executables)


def format_result(result: MesonInitResult) -> str:
    rel = [str(p.relative_to(result.project_dir)) for p in result.written]
    if rel:
        head = f"fentry subproject written to {result.project_dir}/subprojects ({len(rel)} files)"
    else:
        head = f"fentry subproject in {result.project_dir}/subprojects is up to date"
    programs = introspect(result.project_dir)
    if programs is None:
        snippet = meson_snippet("prog", ["prog.c"], {"fix": "patches/fix.c"})
        return (head + "\n\nYour meson.build needs (README.md, 'The Meson snippet'; a generic "
                "one: no configured Meson build folder here to read your programs' names "
                "from):\n\n" + snippet)
    name, sources = programs.executables[0]
    snippet = meson_snippet(name, sources, {"fix": "patches/fix.c"}, programs.project)
    others = [n for n, _ in programs.executables[1:]]
    tail = (f"\nYour other executables ({', '.join(others)}) take dependency('fentry') the same "
            "way, each with a patches dict and foreach of its own.\n" if others else "")
    return (head + f"\n\nYour meson.build needs (README.md, 'The Meson snippet'; with the "
            f"programs Meson configured in {programs.build_dir.name}/):\n\n" + snippet + tail)
