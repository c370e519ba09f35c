"""layout.py - where things are in a user's project: its top folder, its build system, its Meson build folders.

A Meson build folder holds meson-info/ (its meson-info.json names the source folder);
an SCons project is the folder holding the SConstruct.  new-patch, patch-from-diff, the
archive of released builds and apply's advice all ask here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def meson_build_dir(path: Path) -> Path | None:
    """The Meson build folder holding `path` (the nearest folder with meson-info/), if any."""
    for folder in Path(os.path.abspath(path)).parents:
        if (folder / "meson-info").is_dir():
            return folder
    return None


def meson_source_dir(build_dir: Path) -> Path | None:
    """The source folder of a Meson build folder (meson-info/meson-info.json)."""
    try:
        info = json.loads((build_dir / "meson-info" / "meson-info.json").read_text())
        return Path(info["directories"]["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def scons_project_dir(path: Path) -> Path | None:
    """The nearest folder at or above `path` holding an SConstruct."""
    start = Path(os.path.abspath(path))
    for folder in [start, *start.parents]:
        if (folder / "SConstruct").is_file():
            return folder
    return None


def project_of(path: Path) -> tuple[str, Path] | None:
    """("meson", source folder) or ("scons", SConstruct's folder) for a file of a build, or a
    folder of a project; None when neither is around it."""
    build_dir = meson_build_dir(path)
    if build_dir is not None:
        source = meson_source_dir(build_dir)
        if source is not None:
            return "meson", source
    scons = scons_project_dir(path)
    if scons is not None:
        return "scons", scons
    start = Path(os.path.abspath(path))
    for folder in [start, *start.parents]:
        if (folder / "meson.build").is_file() and not (folder.parent / "meson.build").is_file():
            return "meson", folder
    return None


def shown(path: Path) -> str:
    """`path` as a user would type it here: relative to the working folder when below it."""
    absolute = Path(os.path.abspath(path))
    here = Path.cwd()
    if here == Path(here.anchor):
        return str(absolute)  # relative to / reads as relative to wherever the user is
    try:
        return str(absolute.relative_to(here)) or "."
    except ValueError:
        return str(absolute)


__all__ = ["meson_build_dir", "meson_source_dir", "project_of", "scons_project_dir", "shown"]
