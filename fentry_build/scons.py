"""``fentry_build.scons``: the SCons tool under its public name (docs/scons.md).

Everything lives in fentry_build.build.scons; this module re-exports it.
"""

from __future__ import annotations

from fentry_build.build.scons import (
    INSTRUMENT_FLAGS, LINK_FLAGS, PATCHES_ALIAS, SHIM_CFLAGS, SHIM_LIBS, TOOLPATH, Project, exists,
    generate, project,
)

__all__ = ["INSTRUMENT_FLAGS", "LINK_FLAGS", "PATCHES_ALIAS", "SHIM_CFLAGS", "SHIM_LIBS", "TOOLPATH",
           "Project", "exists", "generate", "project"]
