"""fentry_build: userspace live patching for C programs, driven from the build system.

Importing the package is cheap: it imports none of its submodules.  ``fentry_build.scons``
(the SCons tool, see docs/scons.md) is imported on first use, so that an SConstruct that
only does ``import fentry_build`` reaches it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time (fentry_build/record.py says why)
    from typing import Any

__version__ = "0.1.0"

# Submodules an attribute access may import on first use (PEP 562).
_LAZY_SUBMODULES = frozenset({"scons"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def project(first: Any, *args: Any, **kwargs: Any) -> Any:
    """The one entry point of both build systems' users.

    - ``project(DIR, name=None)``: scaffold a new Meson project in DIR (what
      ``fentry-build init DIR`` runs); returns a ``scaffold.ScaffoldResult``.
    - ``project(env, name, sources, patches=...)`` in an SConstruct: build the
      instrumented program and its patches with SCons (see ``fentry_build.scons``).
    """
    if isinstance(first, (str, os.PathLike)):
        from pathlib import Path

        from fentry_build.build import scaffold

        return scaffold.project(Path(first), *args, **kwargs)
    from fentry_build.build import scons

    return scons.project(first, *args, **kwargs)
