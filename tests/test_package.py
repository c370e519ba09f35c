"""The installed package carries what a user's build needs, and its commands run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fentry_build
from fentry_build import paths


def test_tests_run_against_the_installed_wheel_when_asked() -> None:
    if os.environ.get("FENTRY_TEST_INSTALLED") != "1":
        # Developer runs against the source tree; scripts/test.sh sets the variable.
        assert (Path(fentry_build.__file__).parent.parent / "shim").is_dir()
        return
    pkg = Path(fentry_build.__file__).resolve().parent
    assert "site-packages" in pkg.parts
    assert paths.data_dir() == pkg / "data"


def test_package_carries_shim_templates_and_examples() -> None:
    for rel in ["shim/include/fentry.h", "shim/arch/x86_64/entry.S", "shim/meson.build",
                "templates/registration.c.j2", "templates/meson/fentry.wrap.j2",
                "templates/project/meson.build.j2", "examples/hello/hello.c",
                "examples/hello/meson.build"]:
        assert (paths.data_dir() / rel).is_file(), rel


def test_console_script_and_module_entry_point_agree() -> None:
    by_module = subprocess.run([sys.executable, "-m", "fentry_build", "--version"],
                               capture_output=True, text=True, check=True)
    assert by_module.stdout.strip() == f"fentry-build {fentry_build.__version__}"
    script = Path(sys.executable).parent / "fentry-build"
    if os.environ.get("FENTRY_TEST_INSTALLED") == "1":
        by_script = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                   check=True)
        assert by_script.stdout == by_module.stdout
