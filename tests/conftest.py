"""Fixtures several test modules share, and the markers' meaning (registered in pyproject.toml).

Markers that say what a test needs skip it where that is missing:

  needs_gdb     gdb on PATH
  needs_root    running as root
  needs_nobody  switching to uid nobody: root and setpriv

and ``slow`` / ``stress`` mark what the fast lane (``bash scripts/test.sh --fast``) leaves
out: builds of whole example projects, long fuzzing and load runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.builds import PROGRAMS, ServerBuild, build_rel_patch, build_rel_program, run, server_build
from support.servers import Server

_NEEDS = {
    "needs_gdb": (lambda: shutil.which("gdb") is None, "needs gdb"),
    "needs_root": (lambda: os.geteuid() != 0, "needs root"),
    "needs_nobody": (lambda: os.geteuid() != 0 or shutil.which("setpriv") is None,
                     "switching to uid nobody needs root and setpriv"),
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (missing, reason) in _NEEDS.items():
        if item.get_closest_marker(marker) is not None and missing():
            pytest.skip(reason)


# ---- the server example built with gcc (tests/support/builds.py), once per session ---------


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> ServerBuild:
    return server_build(tmp_path_factory)


@pytest.fixture
def started() -> Iterator[list[Server]]:
    """Servers a test started (support.servers.start_server): stopped after it."""
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def loadclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/programs/rel_loadclient.c: threads asking the server example, checking answers."""
    out = tmp_path_factory.mktemp("loadclient") / "rel_loadclient"
    run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(out),
         str(PROGRAMS / "rel_loadclient.c")])
    return out


@pytest.fixture(scope="session")
def gdb_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tests/programs/rel_gdb.c and its patch, for the tests beside a debugger."""
    d = tmp_path_factory.mktemp("gdbprog")
    prog = build_rel_program([PROGRAMS / "rel_gdb.c"], d / "rel_gdb")
    return prog, build_rel_patch(prog, PROGRAMS / "rel_gdb_patch.c", d)
