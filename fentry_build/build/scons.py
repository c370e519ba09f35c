"""build/scons.py - the SCons tool: an instrumented program with the shim linked in, and its patches.

In an SConstruct::

    import fentry_build
    import fentry_build.scons
    env = Environment(tools=['default', fentry_build.scons.generate])
    fentry_build.project(env, 'server', ['server.c'], patches={'fix': 'patches/fix.c'})

or ``env.Tool('fentry', toolpath=[fentry_build.scons.TOOLPATH])`` and then
``env.FentryProject('server', ['server.c'], patches=...)``.  ``scons`` builds the program,
``scons patches`` every patch ``.so`` beside it (see docs/scons.md).

This module imports nothing from SCons at load time, so ``import fentry_build.scons``
works outside SCons too (the SCons objects come in through ``env``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fentry_build import paths
from fentry_build.build import flags, sharedshim

#: Folder holding the tool module ``fentry.py``: ``env.Tool('fentry', toolpath=[TOOLPATH])``.
TOOLPATH = str(Path(__file__).resolve().parent / "scons_tool")

#: On the compile lines of the program only (never at link), as fentry_dep in
#: shim/meson.build: the one list in fentry_build.build.flags.
INSTRUMENT_FLAGS = list(flags.LINKED_INSTRUMENT_ARGS)
#: On the program's link line, as in shim/meson.build: the build-id the generator and the
#: loader match on, and the shim's shadow-variable API exported for patches to call.
#: (generate() makes them Literals, so the shell SCons runs commands with leaves `*` alone.)
LINK_FLAGS = list(flags.PROGRAM_LINK_ARGS)
#: The shim is never instrumented and never takes the user's flags.
SHIM_CFLAGS = list(flags.SHIM_CFLAGS)
SHIM_LIBS = list(flags.SHIM_LIBS)
#: The Alias that builds every patch: ``scons patches``.
PATCHES_ALIAS = "patches"
#: The Alias that archives the program by build-id: ``scons archive`` (docs/workflow.md).
ARCHIVE_ALIAS = "archive"
#: The command-line argument naming the build patches are for: ``scons patches fentry_target=ID``.
TARGET_ARGUMENT = "fentry_target"


def _command_line_argument(name: str) -> str:
    """`scons ... NAME=VALUE`'s VALUE ('' when not given, or outside SCons)."""
    try:
        from SCons.Script import ARGUMENTS  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return ""
    value = ARGUMENTS.get(name, "")
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Project:
    """What :func:`project` declared: the program and, by patch name, its patch files."""

    program: Any  # the NodeList returned by env.Program
    patches: dict[str, Any] = field(default_factory=dict)  # name -> NodeList of NAME.so
    registrations: dict[str, Any] = field(default_factory=dict)  # name -> NodeList of NAME_reg.c


# --------------------------------------------------------------------------- the tool


def exists(env: Any) -> bool:
    """True when the environment's C compiler is gcc (clang has no -flive-patching)."""
    cc = env.subst("$CC") if env.get("CC") else "gcc"
    argv = shlex.split(cc)
    if not argv:
        return False
    exe = env.WhereIs(argv[0]) or (argv[0] if os.path.isabs(argv[0]) else None)
    if not exe or not os.access(exe, os.X_OK):
        return False
    return _is_gcc([exe, *argv[1:]])


def _is_gcc(cc: list[str]) -> bool:
    """Does `cc` predefine __GNUC__ without being clang (or another compiler that imitates gcc)?"""
    try:
        proc = subprocess.run([*cc, "-dM", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    if proc.returncode != 0:
        return False
    macros = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("#define ")}
    impostors = {"__clang__", "__INTEL_COMPILER", "__INTEL_LLVM_COMPILER", "__TINYC__"}
    return "__GNUC__" in macros and not macros & impostors


def generate(env: Any) -> None:
    """Set up `env`: the FENTRY_* construction variables and the method env.FentryProject()."""
    # What the program, the shim (one .S file) and the patches need, unless already there.
    for tool, command in (("gcc", "CCCOM"), ("gnulink", "LINKCOM"), ("gas", "ASPPCOM")):
        if not env.get(command):
            env.Tool(tool)
    env.SetDefault(
        FENTRY_CFLAGS=list(INSTRUMENT_FLAGS),
        FENTRY_LINKFLAGS=[env.Literal(f) for f in LINK_FLAGS],
        FENTRY_SHIM_CFLAGS=list(SHIM_CFLAGS),
        FENTRY_SHIM_LIBS=list(SHIM_LIBS),
        FENTRY_SHIM_DIR=str(paths.shim_dir()),
        FENTRY_INCLUDE_DIR=str(paths.include_dir()),
        FENTRY_PYTHON=sys.executable,
        # '' (the program SCons builds), an archived build-id or a file: what patches are for.
        FENTRY_TARGET=_command_line_argument(TARGET_ARGUMENT),
        FENTRY_SITES=flags.DEFAULT_SITES,
    )
    env.AddMethod(project, "FentryProject")


# --------------------------------------------------------------------------- project()


def project(env: Any, name: str, sources: Any, patches: Any = None, *, default: bool = True) -> Project:
    """Declare the instrumented program `name` from `sources` and its patches.

    patches: a dict name -> patch source, or a list of patch sources (name = file stem).
    Each patch becomes NAME.so beside the program, built by ``scons patches`` only; the
    program is made a Default target (pass default=False to manage Default() yourself).
    """
    if "FENTRY_CFLAGS" not in env:
        generate(env)
    workdir = env.Dir(f"{name}.fentry")  # private files of this program, like Meson's NAME.p/

    sites = env.subst("$FENTRY_SITES")
    if sites not in flags.SITES:
        raise ValueError(f"fentry_build.project: FENTRY_SITES={sites!r}; use one of "
                         f"{', '.join(flags.SITES)}")
    penv = env.Clone()
    penv.Append(CCFLAGS=["$FENTRY_CFLAGS"], CPPPATH=["$FENTRY_INCLUDE_DIR"],
                LINKFLAGS=["$FENTRY_LINKFLAGS"], LIBS=list(env["FENTRY_SHIM_LIBS"]))
    if sites == "prepared":  # no site list at start: the program's file holds the sites' form
        penv["FENTRY_CFLAGS"] = [f for f in env["FENTRY_CFLAGS"] if f != "-mrecord-mcount"]
    srcs = [os.fspath(s) if isinstance(s, os.PathLike) else s for s in env.Flatten([sources])]
    program = penv.Program(name, srcs + _shim_objects(env, workdir.Dir("shim")))
    if sites == "prepared":
        # After every link: the sites written into the file (fentry_build/build/prepare.py),
        # by the interpreter running SCons, which finds this package.
        penv["ENV"] = _generator_env(env)
        penv.AddPostAction(program, penv.Action(
            [["$FENTRY_PYTHON", "-m", "fentry_build.build.prepare", "$TARGET"]]))
    if default:
        env.Default(program)

    result = Project(program=program)
    for patch_name, patch_src in _patch_sources(patches).items():
        reg, so = _patch(env, program, workdir, patch_name, patch_src)
        result.registrations[patch_name] = reg
        result.patches[patch_name] = so
    env.Alias(PATCHES_ALIAS, list(result.patches.values()))
    archive = env.Alias(ARCHIVE_ALIAS, program,
                        [["$FENTRY_PYTHON", "-m", "fentry_build", "archive", "$SOURCE"]],
                        ENV=_generator_env(env))
    env.AlwaysBuild(archive)
    return result


def _shim_objects(env: Any, objdir: Any) -> list[Any]:
    """The shim compiled from the package's sources into objdir: no -pg, none of the user's flags."""
    senv = env.Clone(CCFLAGS=["$FENTRY_SHIM_CFLAGS"], CFLAGS=[], ASFLAGS=["$FENTRY_SHIM_CFLAGS"],
                     CPPDEFINES=[], CPPFLAGS=[], CPPPATH=["$FENTRY_SHIM_DIR", "$FENTRY_INCLUDE_DIR"])
    objs = []
    shim = paths.shim_dir()
    for src in sharedshim.shim_sources():  # every .c and .S of the shim, as the shared shim builds
        # PART/NAME.c.o: the source lives outside the project, so the object is named explicitly.
        target = objdir.File(src.relative_to(shim).as_posix() + env.subst("$OBJSUFFIX"))
        objs += senv.Object(target=target, source=env.File(str(src)))
    return objs


def _patch_sources(patches: Any) -> dict[str, Any]:
    """Normalise patches= to {name: source}: a dict, or a list of sources named by their stem."""
    if patches is None:
        return {}
    if isinstance(patches, Mapping):
        named = dict(patches)
    else:
        if isinstance(patches, (str, os.PathLike)) or not isinstance(patches, Iterable):
            patches = [patches]
        named = {}
        for src in patches:
            stem = Path(str(src)).stem
            if stem in named:
                raise ValueError(f"fentry_build.project: two patches named {stem!r}; "
                                 "pass a dict {name: source} to name them apart")
            named[stem] = src
    for n in named:
        if not isinstance(n, str) or not n or "/" in n or n.startswith("."):
            raise ValueError(f"fentry_build.project: bad patch name {n!r} (a file name without '/')")
    return named


def _patch(env: Any, program: Any, workdir: Any, name: str, source: Any) -> tuple[Any, Any]:
    """The registration of one patch and its NAME.so beside the program."""
    pdir = workdir.Dir("patches")
    src = env.File(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    benv = env.Clone()  # the user's flags (headers of the program), never -pg
    place = pdir.File(f"{name}_place.h")
    # The placement header: each replacement starts where its site can jump straight to it.
    benv.Append(CPPPATH=["$FENTRY_INCLUDE_DIR"], CCFLAGS=["-include", place.abspath])
    generated = benv.Command(
        target=[pdir.File(f"{name}_reg.c"), place],
        source=[program[0], src],  # the program first: a relinked program regenerates it
        # After --: the line the patch is compiled with (SHCCCOM's), so that the generator
        # finds its FENTRY_* uses and checks its types as this build compiles it.
        action=[["$FENTRY_PYTHON", "-m", "fentry_build.gen", "--target=$FENTRY_TARGET",
                 "--binary", "${SOURCES[0]}", "--patch", "${SOURCES[1]}", "-o", "${TARGETS[0]}",
                 "--place", "${TARGETS[1]}", "--", "$SHCC", "$SHCFLAGS", "$SHCCFLAGS",
                 "$_CCCOMCOM"]],
        ENV=_generator_env(env),
    )
    reg = generated[0:1]
    env.Depends(generated, [env.File(str(t)) for t in sorted(paths.templates_dir().glob("*.j2"))])

    suffix = env.subst("$SHOBJSUFFIX")
    objs = (benv.SharedObject(target=pdir.File(name + suffix), source=src)
            + benv.SharedObject(target=pdir.File(f"{name}_reg" + suffix), source=reg))
    env.Depends(objs, place)  # -include'd: no scanner sees it
    so = benv.LoadableModule(target=program[0].dir.File(f"{name}.so"), source=objs,
                             LDMODULEPREFIX="", LDMODULESUFFIX=".so")
    return reg, so


def _generator_env(env: Any) -> dict[str, str]:
    """The process environment of the generator: SCons's, plus where this package was imported from.

    SCons runs commands with a minimal environment (no PYTHONPATH), so a package used
    from a source checkout would not be found by ``python -m fentry_build.gen``.
    """
    penv = dict(env["ENV"])
    root = str(Path(__file__).resolve().parents[2])  # the folder holding fentry_build/
    installed = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    if os.path.realpath(root) not in installed:
        penv["PYTHONPATH"] = os.pathsep.join(p for p in (root, penv.get("PYTHONPATH")) if p)
    return penv
