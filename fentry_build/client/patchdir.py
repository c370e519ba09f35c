"""The patch directory: where a process loads its installed patches from at start.

A process loads ``<dir>/<its build-id>/*.so`` before ``main`` (``shim/core/patchdir.c``).
``<dir>`` follows one rule, whose names this module reads from the shim's public header
(``fentry.h``: FENTRY_PATCH_DIR_ENV, FENTRY_PATCH_DIR_ROOT, FENTRY_PATCH_DIR_USER), so the
shim and the tools that install patches there cannot disagree.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

from fentry_build import paths
from fentry_build.errors import FentryError

_NAMES = ("FENTRY_PATCH_DIR_ENV", "FENTRY_PATCH_DIR_ROOT", "FENTRY_PATCH_DIR_USER")


@functools.cache
def _header_names() -> dict[str, str]:
    """The string macros of the rule, as fentry.h defines them (our own header)."""
    text = (paths.include_dir() / "fentry.h").read_text()
    found = dict(re.findall(r'^#define (FENTRY_PATCH_DIR_\w+) "([^"]*)"', text, re.M))
    missing = [n for n in _NAMES if n not in found]
    if missing:
        raise FentryError(f"fentry.h does not define {', '.join(missing)}; reinstall fentry_build")
    return found


def patch_dir(euid: int, env: Mapping[str, str], secure: bool = False) -> Path | None:
    """The patch directory of a process of effective uid `euid` started with `env`.

    `secure`: it runs with AT_SECURE (setuid, setgid, capabilities) and ignores its
    environment. None when it has none (a relative FENTRY_PATCH_DIR is refused).
    """
    names = _header_names()
    explicit = "" if secure else env.get(names["FENTRY_PATCH_DIR_ENV"], "")
    if explicit:
        return Path(explicit) if explicit.startswith("/") else None
    if euid == 0:
        return Path(names["FENTRY_PATCH_DIR_ROOT"])
    if secure:
        return None
    xdg, home = env.get("XDG_DATA_HOME", ""), env.get("HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / names["FENTRY_PATCH_DIR_USER"]
    if home.startswith("/"):
        return Path(home) / ".local" / "share" / names["FENTRY_PATCH_DIR_USER"]
    return None


def build_dir(root: Path, build_id: str) -> Path:
    """The folder of one build's patches: ``<dir>/<build-id>``."""
    return root / build_id


__all__ = ["patch_dir", "build_dir"]
