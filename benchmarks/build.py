"""build.py - compiles the benchmark programs the way a fentry_build user's build does.

Instrumented programs get the flags of ``dependency('fentry')`` (fentry_build.build.flags,
which tests/test_facts.py holds to the shim's own ``meson.build``) on their compile lines
only, and the shim linked in; patches are registered with the real generator
(``python -m fentry_build.gen``) and linked as shared objects, exactly as
``tests/support/builds.py`` and the Meson subproject do.
The shim is compiled once and its objects are shared by every instrumented program.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import fentry_build
except ImportError:  # a source checkout run with a Python that has no fentry_build installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fentry_build

from fentry_build import paths
from fentry_build.build import flags, sharedshim

HERE = Path(__file__).resolve().parent
SHIM_CFLAGS = list(sharedshim.SHIM_CFLAGS)
PROGRAM_CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror"]
LINK_FLAGS = ["-Wl,--build-id=sha1"]  # what fentry_dep adds: patches match the build-id
XRAY_FLAGS = ["-fxray-instrument", "-fxray-instruction-threshold=1"]


class BuildError(Exception):
    pass


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise BuildError(f"command failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def instrument_flags() -> list[str]:
    """The compile flags of dependency('fentry'), from their one Python home
    (fentry_build.build.flags; tests/test_facts.py holds shim/meson.build to the same list)."""
    return list(flags.LINKED_INSTRUMENT_ARGS)


def generator_env() -> dict[str, str]:
    """The environment in which `python -m fentry_build.gen` finds this very package."""
    env = dict(os.environ)
    root = str(Path(fentry_build.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def place_header(reg: Path) -> Path:
    """The placement header the generator writes beside the registration `reg` (x.reg.c)."""
    return reg.with_name(reg.name.removesuffix(".reg.c") + ".place.h")


def generator_command(binary: Path, patch_c: Path, reg: Path,
                      cflags: Sequence[str] = ()) -> list[str]:
    """The generator's command line for a patch (run it with generator_env()): what the
    Meson snippet runs, the placement header included; the scaling benchmark times it
    (benchmarks/scaling/rows_generator.py).  After --: the line the patch is compiled with
    (the generator compiles the patch too)."""
    return [sys.executable, "-m", "fentry_build.gen", "--binary", str(binary), "--patch",
            str(patch_c), "-o", str(reg), "--place", str(place_header(reg)), "--", "gcc", *cflags]


def clang() -> str | None:
    """clang, if installed (whether it can build XRay programs shows when it is tried)."""
    return shutil.which("clang")


class Builder:
    """Builds into `out`; every method returns the path of what it built."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self._shim: list[Path] | None = None
        self.instrument = instrument_flags()

    def shim_objects(self) -> list[Path]:
        """The shim, never instrumented, compiled once."""
        if self._shim is None:
            d = self.out / "shim"
            d.mkdir(exist_ok=True)
            includes = [f"-I{i}" for i in paths.shim_include_dirs()]
            objs = []
            for src in sharedshim.shim_sources():
                obj = d / (src.name + ".o")
                run(["gcc", *SHIM_CFLAGS, *includes, "-c", str(src), "-o", str(obj)])
                objs.append(obj)
            self._shim = objs
        return self._shim

    def _compile_link(self, cc: str, sources: list[Path], name: str, cflags: Sequence[str],
                      extra_objs: Sequence[Path] = (), ldflags: Sequence[str] = ()) -> Path:
        exe = self.out / name
        objs = []
        for src in sources:
            obj = self.out / f"{name}.{src.name}.o"
            run([cc, *PROGRAM_CFLAGS, *cflags, "-c", str(src), "-o", str(obj)])
            objs.append(obj)
        run([cc, *LINK_FLAGS, *ldflags, "-o", str(exe), *map(str, objs), *map(str, extra_objs),
             "-lpthread", "-ldl"])
        return exe

    def plain(self, sources: list[Path], name: str, cflags: Sequence[str] = (),
              cc: str = "gcc", libs: Sequence[Path] = ()) -> Path:
        """An ordinary build: no instrumentation, no shim; linked with shared `libs`."""
        rpath = [f"-Wl,-rpath,{lib.parent}" for lib in libs]
        return self._compile_link(cc, sources, name, list(cflags), list(libs), rpath)

    def shared_lib(self, sources: list[Path], name: str) -> Path:
        """An ordinary shared library (no instrumentation)."""
        so = self.out / f"lib{name}.so"
        run(["gcc", *PROGRAM_CFLAGS, "-shared", "-fPIC", "-o", str(so), *map(str, sources)])
        return so

    def instrumented(self, sources: list[Path], name: str, cflags: Sequence[str] = ()) -> Path:
        """Instrumentation flags on compile lines only, the shim linked, no -pg at link."""
        return self._compile_link("gcc", sources, name,
                                  [*self.instrument, f"-I{paths.include_dir()}", *cflags],
                                  self.shim_objects())

    def xray(self, sources: list[Path], name: str, cflags: Sequence[str] = ()) -> Path:
        """clang with XRay sleds in every function; the XRay runtime linked by clang."""
        return self._compile_link("clang", sources, name, [*XRAY_FLAGS, *cflags],
                                  ldflags=XRAY_FLAGS)

    def patch(self, binary: Path, patch_c: Path, subdir: str,
              cflags: Sequence[str] = ()) -> Path:
        """The registration from the real generator, compiled with the patch into a .so.

        The .so is named after the patch source (the patch's name is its file name) and
        lands in patches-`subdir`, so that patches of different programs never share a name.
        """
        d = self.out / f"patches-{subdir}"
        d.mkdir(exist_ok=True)
        so = d / (patch_c.stem + ".so")
        reg = d / (patch_c.stem + ".reg.c")
        run(generator_command(binary, patch_c, reg, cflags), env=generator_env())
        return self.link_patch(patch_c, reg, so, cflags)

    def link_patch(self, patch_c: Path, reg: Path, so: Path, cflags: Sequence[str] = ()) -> Path:
        """The patch and its registration (the generator's output) linked into `so`, its
        replacements placed as the placement header says."""
        run(["gcc", "-O2", "-g", "-shared", "-fPIC", *cflags, f"-I{paths.include_dir()}",
             "-include", str(place_header(reg)), "-o", str(so), str(patch_c), str(reg)])
        return so
