"""fentry_build: userspace live patching for C programs, driven from the build system."""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# Cheap (imports neither SCons nor pyelftools): makes `fentry_build.scons.generate`
# usable after a plain `import fentry_build` in an SConstruct.
from fentry_build import scons  # noqa: E402


def project(first: Any, *args: Any, **kwargs: Any) -> Any:
    """The one entry point of both build systems' users.

    - ``project(DIR, name=None)``: scaffold a new Meson project in DIR (what
      ``fentry-build init DIR`` runs); returns a ``scaffold.ScaffoldResult``.
    - ``project(env, name, sources, patches=...)`` in an SConstruct: build the
      instrumented program and its patches with SCons (see ``fentry_build.scons``).
    """
    if isinstance(first, (str, os.PathLike)):
        from fentry_build import scaffold

        return scaffold.project(first, *args, **kwargs)
    from fentry_build import scons

    return scons.project(first, *args, **kwargs)
