"""Running the ``fentry-build`` command and other Python commands of the package, as a user
or as uid nobody, and checking their one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fentry_build

from support.nobody import readable_package_parent

CLI = [sys.executable, "-m", "fentry_build"]
#: The folder that holds the fentry_build under test (site-packages, or the checkout).
PACKAGE_PARENT = str(Path(fentry_build.__file__).resolve().parent.parent)
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
#: A bound on one CLI run (an attach on a loaded 2-core machine included), not a speed
#: requirement: a run that reaches it has hung.
CLI_TIMEOUT = 90.0


def package_env(**extra: str) -> dict[str, str]:
    """Our environment with the package under test importable, without LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH"))
                                        if p)
    env.update(extra)
    return env


def cli(*args: str, timeout: float = CLI_TIMEOUT, as_nobody: bool = False,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fentry-build ARGS`` (as ``python -m fentry_build``), from /, its output captured.

    `as_nobody` runs it as uid nobody, importing a world-readable copy of the package.
    """
    env = package_env(**(env_extra or {}))
    if as_nobody:
        env["PYTHONPATH"] = readable_package_parent()
    cmd = [*AS_NOBODY, *CLI, *args] if as_nobody else [*CLI, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def python(*args: str, timeout: float = CLI_TIMEOUT, **env: str) -> subprocess.CompletedProcess[str]:
    """This interpreter with ARGS (``-m fentry_build.gen ...``), the package importable."""
    full = {k: v for k, v in package_env(**env).items()
            if not k.startswith("FENTRY_") or k in env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd="/")


def python_for_nobody(env: dict[str, str]) -> str:
    """An interpreter uid nobody may run that imports fentry_build (a venv may be private)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([*AS_NOBODY, candidate, "-c", "import fentry_build.cli"],
                               env=env, capture_output=True, timeout=30, cwd="/")
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python that uid nobody can run imports fentry_build")


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("fentry-build: error: "), result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
