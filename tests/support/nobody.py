"""A copy of the installed fentry_build that uid nobody can read.

Tests that run a client as another user must not depend on where the suite's own venv
lies: a fresh clone in a 0700 folder (`mktemp -d`) hides it from other users.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from pathlib import Path

import elftools
import jinja2
import markupsafe

import fentry_build
from fentry_build import paths


@cache
def readable_package_parent() -> str:
    """A world-readable folder holding copies of fentry_build (with its data) and its dependencies."""
    public = Path(tempfile.mkdtemp(prefix="fentry-public-"))
    copy = public / "fentry_build"
    shutil.copytree(Path(fentry_build.__file__).resolve().parent, copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not (copy / "data").is_dir():  # a source checkout: the data folders are top-level
        for name in ("shim", "templates", "examples"):
            shutil.copytree(paths.data_dir() / name, copy / "data" / name)
    # What the CLI imports besides itself (attach and check read ELF files).
    for dep in (elftools, jinja2, markupsafe):
        shutil.copytree(Path(dep.__file__).resolve().parent, public / dep.__name__,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for p in [public, *public.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return str(public)
