"""A patch can target an instrumented shared library, identified by its build-id."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support.builds import INSTRUMENT, PROGRAMS, build_patch, build_program, run


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
def test_patch_of_a_library_loaded_after_start(tmp_path: Path, mode: str) -> None:
    prog = build_program([PROGRAMS / "lib_main.c"], tmp_path / "lib_main")
    lib = tmp_path / "lib_plugin.so"
    # The library is instrumented but carries no shim: its calls of __fentry__ bind to
    # the program's, which the program exports for that reason.
    run(["gcc", "-O2", "-shared", "-fPIC", *[f for f in INSTRUMENT if f != "-mrecord-mcount"],
         "-Wl,--build-id=sha1", "-o", str(lib), str(PROGRAMS / "lib_plugin.c")])
    patch = build_patch(lib, PROGRAMS / "lib_plugin_patch.c", tmp_path / "lib_plugin_patch.so")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0"})
    out = subprocess.run([str(prog), str(lib), str(patch)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["before 50", "patched 51", "reverted 50"]


def test_a_library_patch_is_refused_when_the_library_is_not_loaded(tmp_path: Path) -> None:
    prog = build_program([PROGRAMS / "lib_main.c"], tmp_path / "lib_main")
    lib = tmp_path / "lib_plugin.so"
    run(["gcc", "-O2", "-shared", "-fPIC", "-pg", "-mfentry", "-Wl,--build-id=sha1",
         "-o", str(lib), str(PROGRAMS / "lib_plugin.c")])
    patch = build_patch(lib, PROGRAMS / "lib_plugin_patch.c", tmp_path / "lib_plugin_patch.so")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_CONTROL": "0", "FENTRY_PATCHES": str(patch)})
    # FENTRY_PATCHES applies before main, before the program dlopens the library.
    out = subprocess.run([str(prog), str(lib), str(patch)], capture_output=True, text=True,
                         env=env, timeout=60)
    first = out.stderr.splitlines()[0]
    assert "not loaded" in first and "lib_plugin.so" in first and "build-id" in first
    assert out.stdout.splitlines()[0] == "before 50"
