"""The SCons tool end to end: real scons, real gcc, the real generator and shim.

Each test copies examples/hello (or writes an SConstruct of its own) into a tmp dir and
runs scons there as a subprocess of this interpreter (`python -m SCons`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fentry_build
from fentry_build import paths
from fentry_build.binary.elf import SiteForm, read_binary
from fentry_build.build import flags, sharedshim
from fentry_build.build import scons as fscons

from support.builds import PROGRAMS, assert_placed

SCons = pytest.importorskip("SCons", reason="scons is not installed (pip install scons)")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

REPO_ROOT = Path(fentry_build.__file__).resolve().parent.parent
HELLO = paths.examples_dir() / "hello"
ORIGINAL_OUTPUT = "my function: 123!"
PATCHED_OUTPUT = "my_patch: 123"


def scons_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def scons(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "SCons", "-Q", *args], cwd=cwd, env=scons_env(),
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"scons {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_program(program: Path, patches: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FENTRY_PATCHES"}
    if patches is not None:
        env["FENTRY_PATCHES"] = str(patches.resolve())
    proc = subprocess.run([str(program)], cwd=program.parent, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def build_id(program: Path) -> str:
    out = subprocess.run(["readelf", "-n", str(program)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert m, out
    return m.group(1)


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    """A private copy of examples/hello, without anything a previous build left in it."""
    dest = tmp_path / "hello"
    shutil.copytree(HELLO, dest, ignore=shutil.ignore_patterns(
        "build*", "*.o", "*.os", "*.so", "hello", "hello.fentry", ".sconsign*", "subprojects"))
    return dest


@pytest.mark.slow
def test_plain_scons_builds_the_program_but_no_patch(hello: Path) -> None:
    scons(hello)
    assert (hello / "hello").is_file()
    assert not list(hello.rglob("*.so"))
    assert not list(hello.rglob("*_reg.c"))
    assert run_program(hello / "hello") == ORIGINAL_OUTPUT
    assert not (hello / "gmon.out").exists()


@pytest.mark.slow
def test_scons_patches_builds_the_patch_beside_the_program(hello: Path) -> None:
    scons(hello)
    scons(hello, "patches")
    so = hello / "my_patch.so"
    assert so.is_file()
    assert not (hello / "libmy_patch.so").exists()
    assert_placed(hello / "hello", so, {"my_function": "my_patch"})
    assert run_program(hello / "hello", so) == PATCHED_OUTPUT
    assert run_program(hello / "hello") == ORIGINAL_OUTPUT
    assert not list(hello.rglob("gmon.out"))


@pytest.mark.slow
def test_patches_alone_builds_the_program_it_needs(hello: Path) -> None:
    scons(hello, "patches")
    assert run_program(hello / "hello", hello / "my_patch.so") == PATCHED_OUTPUT


@pytest.mark.slow
def test_instrumentation_is_on_compile_lines_only(hello: Path) -> None:
    lines = scons(hello, "-n", ".", "patches").stdout.splitlines()
    gcc = [line for line in lines if line.startswith("gcc ")]

    def cmd(pattern: str) -> list[str]:
        found = [line for line in gcc if re.search(pattern, line)]
        assert found, f"no command matches {pattern!r} in:\n" + "\n".join(gcc)
        return found

    for line in cmd(r" -c .*\bhello\.c$"):
        # The default FENTRY_SITES=prepared: no site list for the shim to read at start.
        for flag in flags.PREPARED_INSTRUMENT_ARGS:  # -pg -mfentry -flive-patching=...
            assert flag in line.split()
        assert "-mrecord-mcount" not in line.split()
    assert "-mrecord-mcount" in fscons.INSTRUMENT_FLAGS
    # After the link, the sites are written into the program (fentry_build.build.prepare).
    prep = [line for line in lines if "fentry_build.build.prepare" in line]
    assert len(prep) == 1 and prep[0].startswith(sys.executable + " -m fentry_build.build.prepare hello")
    link = cmd(r"^gcc -o hello ")
    assert len(link) == 1
    assert "-pg" not in link[0].split() and "-mfentry" not in link[0].split()
    assert "-lpthread" in link[0].split() and "-ldl" in link[0].split()
    assert "-Wl,--build-id=sha1" in link[0].split()
    assert "-Wl,--export-dynamic-symbol=fentry_shadow_*" in link[0].split()
    # The shim: every source of the package's shim, compiled into the build tree, never instrumented.
    shim_lines = cmd(re.escape(str(paths.shim_dir())) + r"/[\w/]+\.[cS]$")
    assert len(shim_lines) == len(sharedshim.shim_sources())
    for line in shim_lines:
        assert "-pg" not in line.split() and "-O2" in line.split() and "-fPIC" in line.split()
        assert "hello.fentry/shim/" in line
    # The patch: built without -pg, as a shared object beside the program.
    for line in cmd(r"my_patch"):
        assert "-pg" not in line.split()
    so_link = cmd(r"-o my_patch\.so ")
    assert "-shared" in so_link[0].split()
    gen = [line for line in lines if "fentry_build.gen" in line]
    assert len(gen) == 1 and gen[0].startswith(sys.executable + " -m fentry_build.gen --target= --binary hello ")
    # ... and it compiles the patch as the patch is compiled (its line after --).
    assert " -- gcc " in gen[0] and f"-I{paths.include_dir()}" in gen[0].split()


def site_forms(program: Path) -> set[SiteForm]:
    return {f.site.form for f in read_binary(program).functions
            if f.site and f.name == "my_function"}


@pytest.mark.slow
def test_program_has_its_sites_prepared_and_exports_the_shadow_api(hello: Path) -> None:
    # A file the shell would glob `fentry_shadow_*` into, were the flag not quoted.
    (hello / "-Wl,--export-dynamic-symbol=fentry_shadow_decoy").write_text("")
    scons(hello)
    sections = subprocess.run(["readelf", "-SW", str(hello / "hello")], capture_output=True,
                              text=True, check=True).stdout
    assert ".fentry_sites" in sections and "__mcount_loc" not in sections
    assert site_forms(hello / "hello") == {SiteForm.PREPARED_6}
    dynsyms = subprocess.run(["readelf", "--dyn-syms", "-W", str(hello / "hello")],
                             capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bfentry_shadow_get_or_alloc\b", dynsyms)


SHADOW_PATCH = r"""
#include <stdio.h>
#include <fentry.h>

static void counted(int x)
{
	int *calls = fentry_shadow_get_or_alloc((void *)&counted, 1, sizeof *calls, NULL, NULL);
	printf("counted: %d (%d)\n", x, calls ? ++*calls : -1);
}

FENTRY_REPLACE(my_function, counted);
"""


@pytest.mark.slow
def test_a_patch_can_call_the_shadow_api_of_the_program(hello: Path) -> None:
    (hello / "patches" / "shadow.c").write_text(SHADOW_PATCH)
    sconstruct = hello / "SConstruct"
    sconstruct.write_text(sconstruct.read_text().replace(
        "{'my_patch': 'patches/my_patch.c'}", "{'my_patch': 'patches/my_patch.c', 'shadow': 'patches/shadow.c'}"))
    scons(hello, "patches")
    assert run_program(hello / "hello", hello / "shadow.so") == "counted: 123 (1)"


FOLDED_PATCH = """#include <fentry.h>
static int scale_new(int x) { return x; }
FENTRY_REPLACE(scale, scale_new);
"""


@pytest.mark.slow
def test_the_generator_names_the_callers_of_a_copy_dwarf_does_not_record(hello: Path) -> None:
    # scale is folded into limit at -O2: DWARF records no copy; $FENTRY_CFLAGS has gcc write
    # hello.c's -fdump-ipa-clones file beside hello.o, where the generator finds it.
    shutil.copy(PROGRAMS / "authoring_folded.c", hello / "hello.c")
    (hello / "patches" / "my_patch.c").write_text(FOLDED_PATCH)
    sconstruct = hello / "SConstruct"
    sconstruct.write_text(sconstruct.read_text().replace(
        "fentry_build.scons.generate])\n", "fentry_build.scons.generate])\nenv.Append(CCFLAGS=['-O2'])\n"))
    assert "-O2" in sconstruct.read_text()
    done = scons(hello, "patches")
    assert (hello / "hello.c.000i.ipa-clones").is_file()
    assert "patching scale may not reach all of its code" in done.stdout + done.stderr
    assert "-fdump-ipa-clones says it was inlined into limit" in done.stdout + done.stderr


@pytest.mark.slow
def test_changing_the_program_regenerates_the_patch(hello: Path) -> None:
    scons(hello, "patches")
    reg = hello / "hello.fentry" / "patches" / "my_patch_reg.c"
    old_id = build_id(hello / "hello")
    assert old_id in reg.read_text()
    old_so = (hello / "my_patch.so").read_bytes()

    src = hello / "hello.c"
    src.write_text(src.read_text().replace("my function: %d!", "my function (v2): %d!"))
    scons(hello)  # a plain build relinks the program but leaves the patches alone
    new_id = build_id(hello / "hello")
    assert new_id != old_id
    assert run_program(hello / "hello") == "my function (v2): 123!"
    assert (hello / "my_patch.so").read_bytes() == old_so

    scons(hello, "patches")
    text = reg.read_text()
    assert new_id in text and old_id not in text
    assert (hello / "my_patch.so").read_bytes() != old_so
    assert run_program(hello / "hello", hello / "my_patch.so") == PATCHED_OUTPUT
    # Up to date now: a second run does nothing.
    assert "fentry_build.gen" not in scons(hello, "patches").stdout


@pytest.mark.slow
def test_changing_the_patch_rebuilds_only_the_patch(hello: Path) -> None:
    scons(hello, "patches")
    patch = hello / "patches" / "my_patch.c"
    patch.write_text(patch.read_text().replace('"my_patch: %d\\n"', '"my_patch v2: %d\\n"'))
    out = scons(hello, "patches").stdout
    assert "fentry_build.gen" in out and not re.search(r"^gcc -o hello ", out, re.M)
    assert run_program(hello / "hello", hello / "my_patch.so") == "my_patch v2: 123"


SCONSTRUCT_VARIANT = """\
import fentry_build.scons
env = Environment(tools=['default'])
env.Tool('fentry', toolpath=[fentry_build.scons.TOOLPATH])
Export('env')
SConscript('SConscript', variant_dir='build', duplicate=False)
"""
SCONSCRIPT_VARIANT = """\
import fentry_build.scons
Import('env')
result = fentry_build.scons.project(env, 'hello', ['hello.c'], patches=['patches/my_patch.c'])
assert sorted(result.patches) == ['my_patch'], result
assert result.program[0].path == 'build/hello', result.program[0].path
"""


@pytest.mark.slow
def test_tool_by_name_list_of_patches_and_variant_dir(hello: Path) -> None:
    (hello / "SConstruct").write_text(SCONSTRUCT_VARIANT)
    (hello / "SConscript").write_text(SCONSCRIPT_VARIANT)
    scons(hello)
    assert (hello / "build" / "hello").is_file() and not (hello / "build" / "my_patch.so").exists()
    scons(hello, "patches")
    assert run_program(hello / "build" / "hello", hello / "build" / "my_patch.so") == PATCHED_OUTPUT
    # Everything built lives under build/: the shim objects, the registration, the patch.
    built = {p.relative_to(hello).parts[0] for p in hello.rglob("*")
             if p.is_file() and p.suffix in {".o", ".os", ".so"} or p.name.endswith("_reg.c")}
    assert built == {"build"}
    assert (hello / "build" / "hello.fentry" / "shim").is_dir()


SCONSTRUCT_RUNTIME = """\
import fentry_build
env = Environment(tools=['default', fentry_build.scons.generate], FENTRY_SITES='runtime')
fentry_build.project(env, 'hello', ['hello.c'], patches={'my_patch': 'patches/my_patch.c'})
"""


@pytest.mark.slow
def test_fentry_sites_runtime_keeps_the_calls_and_the_site_list(hello: Path) -> None:
    (hello / "SConstruct").write_text(SCONSTRUCT_RUNTIME)
    scons(hello, ".", "patches")
    sections = subprocess.run(["readelf", "-SW", str(hello / "hello")], capture_output=True,
                              text=True, check=True).stdout
    assert "__mcount_loc" in sections and ".fentry_sites" not in sections
    assert site_forms(hello / "hello") == {SiteForm.ADDR32_CALL}
    assert run_program(hello / "hello", hello / "my_patch.so") == PATCHED_OUTPUT


SCONSTRUCT_TOP_LEVEL = """\
import fentry_build
import fentry_build.scons
env = Environment(tools=['default', fentry_build.scons.generate])
fentry_build.project(env, 'hello', ['hello.c'], patches={'my_patch': 'patches/my_patch.c'})
"""
# What the docs promise: `import fentry_build` alone reaches fentry_build.scons.
SCONSTRUCT_PLAIN_IMPORT = """\
import fentry_build
env = Environment(tools=['default', fentry_build.scons.generate])
fentry_build.project(env, 'hello', ['hello.c'], patches={'my_patch': 'patches/my_patch.c'})
"""


@pytest.mark.slow
def test_fentry_build_project_dispatches_to_scons(hello: Path) -> None:
    (hello / "SConstruct").write_text(SCONSTRUCT_TOP_LEVEL)
    scons(hello)
    assert not (hello / "my_patch.so").exists()
    scons(hello, "patches")
    assert run_program(hello / "hello", hello / "my_patch.so") == PATCHED_OUTPUT


@pytest.mark.slow
def test_import_fentry_build_is_enough_in_an_sconstruct(hello: Path) -> None:
    (hello / "SConstruct").write_text(SCONSTRUCT_PLAIN_IMPORT)
    scons(hello, "patches")
    assert run_program(hello / "hello", hello / "my_patch.so") == PATCHED_OUTPUT


@pytest.mark.slow
def test_generator_error_fails_the_build(hello: Path) -> None:
    (hello / "patches" / "bad.c").write_text(
        "#include <fentry.h>\nstatic void repl(int x) { (void)x; }\nFENTRY_REPLACE(no_such_function, repl);\n")
    sconstruct = hello / "SConstruct"
    sconstruct.write_text(sconstruct.read_text().replace(
        "{'my_patch': 'patches/my_patch.c'}", "{'my_patch': 'patches/my_patch.c', 'bad': 'patches/bad.c'}"))
    proc = scons(hello, "patches", check=False)
    assert proc.returncode != 0
    assert "no_such_function" in proc.stderr
    assert not (hello / "bad.so").exists()


# --------------------------------------------------------------------------- exists()


def _environment(**kw: object):  # type: ignore[no-untyped-def]
    from SCons.Environment import Environment

    return Environment(**kw)


def test_exists_is_true_for_gcc() -> None:
    assert fscons.exists(_environment())
    assert fscons.exists(_environment(CC="gcc"))
    assert fscons.exists(_environment(tools=[]))  # no CC: looks for gcc itself


def test_exists_is_false_without_gcc(tmp_path: Path) -> None:
    assert not fscons.exists(_environment(CC="no-such-compiler-fentry"))
    fake_clang = tmp_path / "clang"
    fake_clang.write_text("#!/bin/sh\necho '#define __GNUC__ 4'\necho '#define __clang__ 1'\n")
    fake_clang.chmod(0o755)
    assert not fscons.exists(_environment(CC=str(fake_clang)))
    assert not fscons.exists(_environment(CC="/bin/false"))
    env = _environment(tools=[])
    env["ENV"]["PATH"] = str(tmp_path)  # gcc not on the PATH SCons searches
    assert not fscons.exists(env)


def test_tool_module_reexports_generate_and_exists() -> None:
    tool = Path(fscons.TOOLPATH) / "fentry.py"
    assert tool.is_file()
    text = tool.read_text()
    assert "from fentry_build.build.scons import exists, generate" in text


def test_patches_argument_forms() -> None:
    assert fscons._patch_sources(None) == {}
    assert fscons._patch_sources({"a": "x/y.c"}) == {"a": "x/y.c"}
    assert fscons._patch_sources(["p/one.c", "two.c"]) == {"one": "p/one.c", "two": "two.c"}
    assert fscons._patch_sources("p/one.c") == {"one": "p/one.c"}
    with pytest.raises(ValueError, match="two patches named 'one'"):
        fscons._patch_sources(["a/one.c", "b/one.c"])
    with pytest.raises(ValueError, match="bad patch name"):
        fscons._patch_sources({"a/b": "x.c"})
