"""Direct gcc builds for tests that need a program and a patch but not Meson.

These call the real compiler, the real generator and link the real shim; the Meson
path is tested end to end elsewhere (tests/test_meson.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fentry_build import paths
from fentry_build.build import flags, sharedshim

INSTRUMENT = list(flags.LINKED_INSTRUMENT_ARGS)
SHIM_CFLAGS = list(flags.SHIM_CFLAGS)


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"command failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def shim_sources() -> list[Path]:
    return sharedshim.shim_sources()


def shim_includes() -> list[str]:
    """-I options for compiling the shim's own sources."""
    return [f"-I{d}" for d in paths.shim_include_dirs()]


def build_shim_objects(out_dir: Path) -> list[Path]:
    """Compile the shim (never instrumented) into objects in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in shim_sources():
        obj = out_dir / (src.name + ".o")
        run(["gcc", *SHIM_CFLAGS, *shim_includes(), "-c", str(src), "-o", str(obj)])
        objs.append(obj)
    return objs


def build_program(
    sources: list[Path],
    out: Path,
    *,
    cflags: list[str] | None = None,
    ldflags: list[str] | None = None,
    with_shim: bool = True,
) -> Path:
    """Build an instrumented program: flags on compile lines only, shim linked, no -pg at link."""
    objs: list[Path] = []
    for src in sources:
        obj = out.parent / (out.name + "." + src.name + ".o")
        run(["gcc", "-O2", "-g", *INSTRUMENT, *(cflags or []), f"-I{paths.include_dir()}",
             "-c", str(src), "-o", str(obj)])
        objs.append(obj)
    if with_shim:
        objs += build_shim_objects(out.parent / (out.name + ".shim"))
    run(["gcc", *(cflags or []), *(ldflags or []), *flags.PROGRAM_LINK_ARGS,
         "-o", str(out), *map(str, objs),
         "-lpthread", "-ldl"])
    return out


def build_patch(binary: Path, patch_c: Path, out: Path, *, cflags: list[str] | None = None) -> Path:
    """Generate the registration with the real generator and link the patch .so."""
    reg = out.with_suffix(".reg.c")
    run([sys.executable, "-m", "fentry_build.gen", "--binary", str(binary), "--patch", str(patch_c),
         "-o", str(reg)])
    run(["gcc", "-O2", "-g", "-shared", "-fPIC", *(cflags or []), f"-I{paths.include_dir()}",
         "-o", str(out), str(patch_c), str(reg)])
    return out
