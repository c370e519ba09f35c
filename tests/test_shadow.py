"""Shadow variables (fentry.h): the API the program's shim exports to patches."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.builds import PROGRAMS, build_program


def test_shadow_api_every_call_and_eight_racing_threads(tmp_path: Path) -> None:
    prog = build_program([PROGRAMS / "shadow.c"], tmp_path / "shadow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env["FENTRY_CONTROL"] = "0"
    out = subprocess.run([str(prog)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        "ok get alloc get_or_alloc free",
        "ok 8 threads, 64 objects: 64 constructed",
        "ok free_all: 64 destroyed",
    ]


def test_the_program_exports_the_shadow_api_to_patches(tmp_path: Path) -> None:
    prog = build_program([PROGRAMS / "shadow.c"], tmp_path / "shadow")
    dynsyms = subprocess.run(["nm", "-D", "--defined-only", str(prog)], capture_output=True,
                             text=True, check=True).stdout
    for name in ["fentry_shadow_get", "fentry_shadow_alloc", "fentry_shadow_get_or_alloc",
                 "fentry_shadow_free", "fentry_shadow_free_all"]:
        assert f" {name}\n" in dynsyms, name
