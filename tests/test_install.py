"""README's install instructions, run as written in a fresh virtual environment; the messages
that tell users how to install give commands that work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


CHECKOUT = Path(__file__).resolve().parent.parent
README = CHECKOUT / "README.md"


def readme_install_block() -> list[str]:
    """The commands of the first ```sh block under README's "## Install"."""
    text = README.read_text()
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "README.md: no ```sh block under ## Install"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()
            if line.split("#", 1)[0].strip()]


def test_readme_install_block_is_a_venv_not_a_bare_pip_install() -> None:
    lines = readme_install_block()
    assert "python3 -m venv .venv" in lines
    assert not any(re.match(r"(sudo )?pip3? install", line) for line in lines)


@pytest.mark.slow
def test_readme_install_lines_work_as_written_in_a_fresh_checkout(tmp_path: Path) -> None:
    # A copy of the checkout, as a user clones it (no .venv, no build output).
    checkout = tmp_path / "fentry_build"
    local = {".venv", "dist", "build", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == CHECKOUT  # fentry_build/build/ is a package, not output
        return {n for n in names if n == "__pycache__" or (top and n in local)}

    shutil.copytree(CHECKOUT, checkout, ignore=ignore)
    # apt-get needs root and a network: what it installs (gcc, python3-venv) is here already.
    commands = [c for c in readme_install_block() if not c.startswith("sudo apt-get")]
    app = tmp_path / "myapp"
    script = "\n".join(["set -eu", *commands,
                        # the Quickstart's first steps, with what was installed
                        f"fentry-build init {app}", f"cd {app}",
                        "meson setup build >/dev/null", "meson compile -C build patches >/dev/null",
                        "command -v fentry-build meson ninja"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    proc = subprocess.run(["bash", "-c", script], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = proc.stdout.split()[-3:]  # after pip's own output
    assert found == [str(checkout / ".venv" / "bin" / t) for t in ("fentry-build", "meson", "ninja")]
    assert (app / "build" / "fix_greeting.so").is_file()


def test_subproject_error_names_the_python_and_the_commands_that_install(tmp_path: Path) -> None:
    # Meson run by a Python that has Meson but not fentry_build (e.g. Debian's meson package).
    import mesonbuild

    pythonpath = tmp_path / "only_meson"
    pythonpath.mkdir()
    (pythonpath / "mesonbuild").symlink_to(Path(mesonbuild.__file__).parent)
    project = tmp_path / "p"
    project.mkdir()
    (project / "meson.build").write_text("project('p', 'c')\nfentry = dependency('fentry')\n")
    from fentry_build.build import meson_init
    meson_init.meson_init(project)
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin") or sys.executable
    proc = subprocess.run([python, "-s", "-m", "mesonbuild.mesonmain", "setup", "build"],
                          cwd=project, capture_output=True, text=True, timeout=300,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(pythonpath),
                               "HOME": str(tmp_path)})
    assert proc.returncode != 0
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "cannot import fentry_build" in ln)
    assert "python" in line and "VENV/bin/activate" in line
    assert "python3 -m venv VENV && VENV/bin/pip install /path/to/fentry_build" in line
    assert "pip install fentry_build" not in line  # not on PyPI
