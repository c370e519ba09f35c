"""Run the real Meson (the one installed beside this interpreter) on a user-style project."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fentry_build import paths
from fentry_build.build import meson_init


def meson_cmd() -> list[str]:
    beside = Path(sys.executable).parent / "meson"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("meson")
    assert found, "meson is not installed"
    return [found]


def meson(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*meson_cmd(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"meson {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_example(name: str, dest: Path) -> Path:
    """Copy examples/<name> to dest and give it the fentry subproject, as a user would."""
    shutil.copytree(paths.examples_dir() / name, dest,
                    ignore=shutil.ignore_patterns("build*", "subprojects"))
    meson_init.meson_init(dest)
    return dest


def setup_and_compile(project: Path, *options: str) -> Path:
    meson("setup", "build", *options, cwd=project)
    meson("compile", "-C", "build", cwd=project)
    return project / "build"
