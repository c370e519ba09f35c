"""Builds for the tests: direct gcc builds, Meson runs, the server example and its patches.

The gcc builds call the real compiler, the real generator and link the real shim, with
the flags of fentry_build.build.flags; the Meson path is tested end to end in
tests/test_meson.py.  The Meson helpers run the real Meson installed beside this
interpreter on a user-style project.
"""

from __future__ import annotations

import atexit
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from fentry_build import paths
from fentry_build.binary.elf import JUMP_ROW, read_binary
from fentry_build.build import flags, ldwrap, meson_init, sharedshim

TESTS = Path(__file__).resolve().parent.parent
PROGRAMS = TESTS / "programs"
EXAMPLE = paths.examples_dir() / "server"

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


# The shim's objects for each set of extra flags, compiled once per test process: every
# program a test builds links the same shim, and compiling it (22 files) took 7 s each time.
_shim_cache: dict[tuple[str, ...], list[Path]] = {}


def build_shim_objects(extra_cflags: list[str] | None = None) -> list[Path]:
    """The shim (never instrumented) compiled to objects, as a build that adds
    `extra_cflags` to every compile line would (e.g. -fsanitize=address); compiled the first
    time these flags are asked for in this process, into a folder removed at exit."""
    key = tuple(extra_cflags or [])
    if key not in _shim_cache:
        out_dir = Path(tempfile.mkdtemp(prefix="fentry-test-shim-"))
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        objs = []
        for src in shim_sources():
            obj = out_dir / (src.name + ".o")
            run(["gcc", *SHIM_CFLAGS, *key, *shim_includes(), "-c", str(src), "-o", str(obj)])
            objs.append(obj)
        _shim_cache[key] = objs
    return _shim_cache[key]


def build_program(
    sources: list[Path],
    out: Path,
    *,
    cflags: list[str] | None = None,
    ldflags: list[str] | None = None,
    with_shim: bool = True,
    shim_cflags: list[str] | None = None,
    sites: str = "runtime",
) -> Path:
    """Build an instrumented program: flags on compile lines only, shim linked, no -pg at link.

    `sites` "runtime" (compiled with -mrecord-mcount: the shim readies the sites at start)
    or "prepared" (without it, linked through the linker wrapper of
    fentry_build.build.ldwrap, which writes the sites' unpatched form into the file, as the
    Meson subproject's default does).
    """
    instrument = INSTRUMENT if sites == "runtime" else list(flags.PREPARED_INSTRUMENT_ARGS)
    link_extra: list[str] = []
    if sites == "prepared":
        wrap = out.parent / (out.name + ".ldwrap")
        ldwrap.write(wrap)
        link_extra = [f"-B{wrap}/"]
    objs: list[Path] = []
    for src in sources:
        obj = out.parent / (out.name + "." + src.name + ".o")
        run(["gcc", "-O2", "-g", *instrument, *(cflags or []), f"-I{paths.include_dir()}",
             "-c", str(src), "-o", str(obj)])
        objs.append(obj)
    if with_shim:
        objs += build_shim_objects(shim_cflags)
    run(["gcc", *(cflags or []), *(ldflags or []), *flags.PROGRAM_LINK_ARGS, *link_extra,
         "-o", str(out), *map(str, objs),
         "-lpthread", "-ldl"])
    return out


def build_patch(binary: Path, patch_c: Path, out: Path, *, cflags: list[str] | None = None) -> Path:
    """Generate the registration and the placement header with the real generator and link
    the patch .so, as the Meson snippet does."""
    reg = out.with_suffix(".reg.c")
    place = out.with_suffix(".place.h")
    # The generator compiles the patch with the flags its build uses (after --).
    run([sys.executable, "-m", "fentry_build.gen", "--binary", str(binary), "--patch", str(patch_c),
         "-o", str(reg), "--place", str(place), "--", "gcc", *(cflags or [])])
    run(["gcc", "-O2", "-g", "-shared", "-fPIC", *(cflags or []), f"-I{paths.include_dir()}",
         "-include", str(place), "-o", str(out), str(patch_c), str(reg)])
    return out


def assert_placed(program: Path, patch_so: Path, pairs: dict[str, str]) -> None:
    """Each replacement `new` of the built patch starts at the address residue the site of
    its `old` in the program jumps to (the placement header was -include'd as it should)."""
    info = read_binary(program)
    with open(patch_so, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert symtab is not None, f"{patch_so} has no .symtab"
        found = {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name in pairs.values()}
    for old, new in pairs.items():
        (f,) = [f for f in info.functions if f.name == old]
        assert f.site is not None
        assert found[new] % JUMP_ROW == f.site.jump_residue(f.addr), (old, new, hex(found[new]))


# ---- Meson ------------------------------------------------------------------------------


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


# ---- the server example, built with gcc once per session ---------------------------------


_built: dict[str, Any] = {}


def build_rel_program(sources: list[Path], out: Path, *, cflags: list[str] | None = None,
                      ldflags: list[str] | None = None) -> Path:
    """build_program for the reliability designs: the example's headers on the include path
    and the shadow API's symbols exported."""
    objs = []
    for src in sources:
        obj = out.parent / f"{out.name}.{src.name}.o"
        run(["gcc", "-O2", "-g", *INSTRUMENT, *(cflags or []), f"-I{paths.include_dir()}",
             f"-I{EXAMPLE}", "-c", str(src), "-o", str(obj)])
        objs.append(obj)
    run(["gcc", *(cflags or []), *(ldflags or []), "-Wl,--export-dynamic-symbol=fentry_shadow_*",
         "-o", str(out), *map(str, objs), *map(str, build_shim_objects()), "-lpthread", "-ldl"])
    return out


def build_rel_patch(binary: Path, source: Path, out_dir: Path) -> Path:
    """The patch `source` for `binary`, as out_dir/STEM.so, mode 0755 whatever the umask."""
    so = build_patch(binary, source, out_dir / f"{source.stem}.so", cflags=[f"-I{EXAMPLE}"])
    so.chmod(0o755)
    return so


@dataclass(frozen=True)
class ServerBuild:
    binary: Path              # examples/server, built with the shim
    patches: dict[str, Path]  # by name: fix_parse, fix_parse_v2, rel_veto_patch, ...
    other_binary: Path        # the same sources built with -O1: another build-id
    other_fix: Path           # fix_parse built for other_binary


SERVER_PATCHES = [EXAMPLE / "patches" / "fix_parse.c", EXAMPLE / "patches" / "fix_parse_v2.c",
                  PROGRAMS / "rel_veto_patch.c", PROGRAMS / "rel_hang_patch.c",
                  PROGRAMS / "rel_evil_patch.c"]


def server_sources() -> list[Path]:
    """The C sources of the example's executable('server', ...) in its meson.build."""
    found = re.search(r"executable\(\s*'server'\s*,([^)]*)\)", (EXAMPLE / "meson.build").read_text())
    names = re.findall(r"'([^']+\.c)'", found.group(1)) if found else []
    return [EXAMPLE / n for n in names] or [EXAMPLE / "server.c", EXAMPLE / "parser.c"]


def server_build(factory: pytest.TempPathFactory) -> ServerBuild:
    """The server example and its patches (built once per session, shared by the modules)."""
    if "server" not in _built:
        d = factory.mktemp("rel_server")
        sources = server_sources()
        binary = build_rel_program(sources, d / "server")
        patches = {src.stem: build_rel_patch(binary, src, d) for src in SERVER_PATCHES}
        (d / "other").mkdir()
        other = build_rel_program(sources, d / "other" / "server", cflags=["-O1"])
        other_fix = build_rel_patch(other, EXAMPLE / "patches" / "fix_parse.c", d / "other")
        _built["server"] = ServerBuild(binary, patches, other, other_fix)
    build: ServerBuild = _built["server"]
    return build
