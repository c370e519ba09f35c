"""Where the files a user's build needs live: shim sources, templates, the Meson
subproject and the examples.

In an installed wheel they are package data under ``fentry_build/data/``; in a source
checkout they are the repository's top-level folders.  Nothing else in the package
should guess paths.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The folder holding ``shim/``, ``templates/``, ``meson/`` and ``examples/``."""
    installed = _PACKAGE / "data"
    if (installed / "shim").is_dir():
        return installed
    return _PACKAGE.parent


def shim_dir() -> Path:
    return data_dir() / "shim"


def templates_dir() -> Path:
    return data_dir() / "templates"


def examples_dir() -> Path:
    return data_dir() / "examples"


def include_dir() -> Path:
    """The folder with ``fentry.h``, the public ABI header (what ``-I`` a patch needs)."""
    return shim_dir() / "include"


def shim_include_dirs() -> list[Path]:
    """What ``-I`` the shim's own sources need: shim/ (they include each other's headers
    as "core/loader.h") and the public header's folder."""
    return [shim_dir(), include_dir()]
