"""A Meson project builds a live-patchable program and its patches (real Meson + Ninja + gcc)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fentry_build.binary.elf import SiteForm, read_binary
from fentry_build.build import meson_init
from fentry_build.errors import FentryError

from support.builds import PROGRAMS, assert_placed, copy_example, meson, meson_cmd, setup_and_compile

CLI = [sys.executable, "-m", "fentry_build"]


def run(prog: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
        args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.pop("FENTRY_PATCHES", None)
    full.update(env or {})
    return subprocess.run([str(prog), *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=60)


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_example("hello", tmp_path_factory.mktemp("meson") / "hello")
    setup_and_compile(project)
    return project


@pytest.mark.slow
def test_plain_compile_builds_the_program_and_no_patch(hello: Path) -> None:
    assert (hello / "build" / "hello").is_file()
    assert not (hello / "build" / "my_patch.so").exists()


@pytest.mark.slow
def test_meson_compile_patches_puts_each_patch_beside_the_program(hello: Path) -> None:
    meson("compile", "-C", "build", "patches", cwd=hello)
    assert (hello / "build" / "my_patch.so").is_file()
    assert_placed(hello / "build" / "hello", hello / "build" / "my_patch.so",
                  {"my_function": "my_patch"})
    plain = run(hello / "build" / "hello")
    assert plain.stdout == "my function: 123!\n"
    patched = run(hello / "build" / "hello",
                  {"FENTRY_PATCHES": str(hello / "build" / "my_patch.so")})
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout == "my_patch: 123\n"
    assert patched.stderr == ""


@pytest.mark.slow
def test_instrumentation_flags_are_on_compile_lines_only(hello: Path) -> None:
    commands = json.loads((hello / "build" / "compile_commands.json").read_text())
    hello_c = [c for c in commands if c["file"].endswith("hello.c")]
    assert hello_c and all("-pg" in shlex.split(c["command"]) for c in hello_c)
    assert all("-mfentry" in shlex.split(c["command"]) for c in hello_c)
    # The shim is never instrumented.
    shim = [c for c in commands if "/shim/" in c["file"]]
    assert shim and not any("-pg" in shlex.split(c["command"]) for c in shim)
    # The patch is not instrumented either.
    patch = [c for c in commands if c["file"].endswith("my_patch.c")]
    assert patch and not any("-pg" in shlex.split(c["command"]) for c in patch)
    ninja = (hello / "build" / "build.ninja").read_text()
    link = re.search(r"^build hello: c_LINKER .*?(?=^build )", ninja, re.S | re.M)
    assert link is not None
    assert "-pg" not in link.group(0)


def my_function_forms(program: Path) -> set[SiteForm]:
    return {f.site.form for f in read_binary(program).functions
            if f.site and f.name == "my_function"}


@pytest.mark.slow
def test_the_sites_are_prepared_as_the_program_is_linked(hello: Path) -> None:
    # The default -Dfentry:sites=prepared: gcc links through the subproject's wrapper.
    ninja = (hello / "build" / "build.ninja").read_text()
    link = re.search(r"^build hello: c_LINKER .*?(?=^build )", ninja, re.S | re.M)
    assert link is not None and "/shim/ldwrap/" in link.group(0)
    assert my_function_forms(hello / "build" / "hello") == {SiteForm.PREPARED_6}
    sections = subprocess.run(["readelf", "-SW", str(hello / "build" / "hello")],
                              capture_output=True, text=True, check=True).stdout
    assert ".fentry_sites" in sections and "__mcount_loc" not in sections
    for mode in ("jump", "dispatch"):  # FENTRY_PATCHES at start, in both modes
        meson("compile", "-C", "build", "patches", cwd=hello)
        patched = run(hello / "build" / "hello", {
            "FENTRY_PATCHES": str(hello / "build" / "my_patch.so"), "FENTRY_MODE": mode})
        assert patched.stdout == "my_patch: 123\n" and patched.stderr == "", (mode, patched)


@pytest.mark.slow
def test_sites_runtime_keeps_the_calls_and_the_site_list(hello: Path) -> None:
    meson("setup", "build-runtime", "-Dfentry:sites=runtime", cwd=hello)
    meson("compile", "-C", "build-runtime", cwd=hello)
    meson("compile", "-C", "build-runtime", "patches", cwd=hello)
    program = hello / "build-runtime" / "hello"
    assert my_function_forms(program) == {SiteForm.ADDR32_CALL}
    sections = subprocess.run(["readelf", "-SW", str(program)], capture_output=True,
                              text=True, check=True).stdout
    assert "__mcount_loc" in sections and ".fentry_sites" not in sections
    patched = run(program, {"FENTRY_PATCHES": str(hello / "build-runtime" / "my_patch.so")})
    assert patched.stdout == "my_patch: 123\n"


@pytest.mark.slow
def test_no_gmon_out_is_ever_written(hello: Path, tmp_path: Path) -> None:
    result = run(hello / "build" / "hello", cwd=tmp_path)
    assert result.returncode == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_patches_are_regenerated_when_the_program_changes(hello: Path, tmp_path: Path) -> None:
    meson("compile", "-C", "build", "patches", cwd=hello)
    old_patch = tmp_path / "my_patch.so"
    old_patch.write_bytes((hello / "build" / "my_patch.so").read_bytes())
    old_reg = (hello / "build" / "my_patch_reg.c").read_text()

    source = hello / "hello.c"
    source.write_text(source.read_text().replace("my function: %d!", "my function (v2): %d!"))
    meson("compile", "-C", "build", cwd=hello)
    assert run(hello / "build" / "hello").stdout == "my function (v2): 123!\n"

    # The stale patch is refused at start; the program runs unpatched.
    stale = run(hello / "build" / "hello", {"FENTRY_PATCHES": str(old_patch)})
    assert stale.returncode == 0
    assert stale.stdout == "my function (v2): 123!\n"
    lines = stale.stderr.splitlines()
    assert len(lines) == 1 and "not loaded" in lines[0] and "build-id" in lines[0]

    meson("compile", "-C", "build", "patches", cwd=hello)
    new_reg = (hello / "build" / "my_patch_reg.c").read_text()
    assert new_reg != old_reg
    fresh = run(hello / "build" / "hello",
                {"FENTRY_PATCHES": str(hello / "build" / "my_patch.so")})
    assert fresh.stdout == "my_patch: 123\n"


def test_meson_init_is_idempotent_and_repairs_its_files(tmp_path: Path) -> None:
    (tmp_path / "meson.build").write_text("project('p', 'c')\n")
    first = meson_init.meson_init(tmp_path)
    assert first.written and not first.unchanged
    assert (tmp_path / "subprojects" / "fentry.wrap").is_file()
    assert (tmp_path / "subprojects" / "fentry" / "shim" / "include" / "fentry.h").is_file()
    second = meson_init.meson_init(tmp_path)
    assert second.written == [] and len(second.unchanged) == len(first.written)
    edited = tmp_path / "subprojects" / "fentry" / "shim" / "core" / "loader.c"
    edited.write_text("broken")
    third = meson_init.meson_init(tmp_path)
    assert third.written == [edited]
    assert edited.read_text() != "broken"


def test_meson_init_removes_files_of_an_older_layout(tmp_path: Path) -> None:
    (tmp_path / "meson.build").write_text("project('p', 'c')\n")
    shim = tmp_path / "subprojects" / "fentry" / "shim"
    (shim / "old").mkdir(parents=True)
    for stale in (shim / "loader.c", shim / "shim.h", shim / "old" / "gone.c"):
        stale.write_text("/* from an older fentry_build */\n")
    result = meson_init.meson_init(tmp_path)
    assert not (shim / "loader.c").exists() and not (shim / "shim.h").exists()
    assert not (shim / "old").exists()
    assert shim / "loader.c" in result.written
    assert (shim / "core" / "loader.c").is_file()


def test_meson_init_cli_tells_what_to_add(tmp_path: Path) -> None:
    (tmp_path / "meson.build").write_text("project('p', 'c')\n")
    out = subprocess.run([*CLI, "meson-init", str(tmp_path)], capture_output=True,
                         text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "dependency('fentry')" in out.stdout
    assert "get_variable('patch_gen')" in out.stdout
    assert "alias_target('patches'" in out.stdout


def test_meson_init_refuses_a_folder_without_meson_build(tmp_path: Path) -> None:
    with pytest.raises(FentryError, match="no meson.build"):
        meson_init.meson_init(tmp_path)
    out = subprocess.run([*CLI, "meson-init", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_init_scaffolds_a_project_that_builds_and_patches(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "init", str(tmp_path / "app")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    project = tmp_path / "app"
    setup_and_compile(project)
    meson("compile", "-C", "build", "patches", cwd=project)
    prog = project / "build" / "app"
    assert run(prog, args=("--once",)).stdout.splitlines()[1] == "hello"
    patched = run(prog, {"FENTRY_PATCHES": str(project / "build" / "fix_greeting.so")},
                  args=("--once",))
    assert patched.stdout.splitlines()[1] == "hello, patched"
    again = subprocess.run([*CLI, "init", str(project)], capture_output=True, text=True)
    assert again.returncode != 0 and "already has a meson.build" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("buildtype", ["debugoptimized", "release"])
def test_server_example_builds_every_patch_at_the_buildtypes_users_use(
        tmp_path: Path, buildtype: str) -> None:
    # At -O2 GCC clones answer() (answer.constprop.0) unless the example keeps it whole;
    # release has no -g of its own: dependency('fentry') adds it, so nothing is unchecked.
    from fentry_build.client import control
    from support.servers import ask, start

    project = copy_example("server", tmp_path / "server")
    env = {**os.environ, "FENTRY_STRICT": "1"}  # a generator warning fails the build
    meson("setup", "build", f"-Dbuildtype={buildtype}", cwd=project)
    built = subprocess.run([*meson_cmd(), "compile", "-C", "build", "patches"], cwd=project,
                           env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "warning" not in (built.stdout + built.stderr).lower()
    server = start(project / "build" / "server")
    try:
        assert ask(server.port, "BAD").startswith("ERR unknown command")
        assert ask(server.port, "STATS") == "OK requests=1 errors=0"  # the counting bug
        control.apply(server.pid, project / "build" / "fix_stats.so")
        assert ask(server.port, "BAD").startswith("ERR unknown command")
        assert ask(server.port, "STATS").startswith("OK requests=2 errors=1 last_error=")
        # Loaded near the program, placed by the snippet's header: no trampoline.
        (patch,) = control.list_patches(server.pid)["patches"]
        costs = control.status(server.pid)["costs"]
        assert patch["near"] is True and costs["trampolines"] == 0
        assert costs["sites_direct"] == len(patch["functions"]) >= 1
    finally:
        server.stop()


def test_meson_init_prints_the_snippet_with_the_projects_own_names(tmp_path: Path) -> None:
    # A configured build folder: Meson's introspection files name the project's programs.
    project = copy_example("server", tmp_path / "server")
    meson("setup", "build", cwd=project)
    out = subprocess.run([*CLI, "meson-init", str(project)], capture_output=True, text=True,
                         env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "project('server', 'c'" in out.stdout
    assert "server = executable('server', 'server.c', 'parser.c', dependencies: fentry)" in out.stdout
    assert "input: [server, src]" in out.stdout
    assert "executable('prog'" not in out.stdout
    # Without a build folder there is nothing to read the names from: the generic one, said so.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "meson.build").write_text("project('bare', 'c')\nexecutable('tool', 'tool.c')\n")
    out = subprocess.run([*CLI, "meson-init", str(bare)], capture_output=True, text=True,
                         env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "a generic one: no configured Meson build folder" in out.stdout
    assert "executable('prog', 'prog.c'" in out.stdout


@pytest.mark.slow
def test_the_generator_sees_the_patch_as_its_meson_compile_line_does(tmp_path: Path) -> None:
    # FENTRY_REPLACE under #ifdef: the generator compiles the patch with its line of
    # compile_commands.json, so the patch's own c_args decide, as they do for the compiler.
    project = copy_example("hello", tmp_path / "hello")
    patch = project / "patches" / "my_patch.c"
    patch.write_text(patch.read_text().replace(
        "FENTRY_REPLACE(my_function, my_patch);",
        "#ifdef WITH_FIX\nFENTRY_REPLACE(my_function, my_patch);\n#endif"))
    build = project / "meson.build"
    build.write_text(build.read_text().replace("    dependencies: patch_dep,\n",
                                               "    dependencies: patch_dep,\n    c_args: ['-DWITH_FIX'],\n"))
    setup_and_compile(project)
    meson("compile", "-C", "build", "patches", cwd=project)
    patched = run(project / "build" / "hello",
                  {"FENTRY_PATCHES": str(project / "build" / "my_patch.so")})
    assert patched.stdout == "my_patch: 123\n"
    build.write_text(build.read_text().replace("    c_args: ['-DWITH_FIX'],\n", ""))
    failed = subprocess.run([*meson_cmd(), "compile", "-C", "build", "patches"], cwd=project,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "no FENTRY_REPLACE(old, new) in this patch (as its build compiles it: none under a " \
           "false #if either)" in failed.stdout + failed.stderr


FOLDED_PATCH = """#include <fentry.h>
static int scale_new(int x) { return x; }
FENTRY_REPLACE(scale, scale_new);
"""


@pytest.mark.slow
def test_the_generator_names_the_callers_of_a_copy_dwarf_does_not_record(tmp_path: Path) -> None:
    # scale is folded into limit at -O2: DWARF records no copy; dependency('fentry') has gcc
    # write the unit's -fdump-ipa-clones file beside its object, and the generator finds it
    # through compile_commands.json and names limit.
    project = copy_example("hello", tmp_path / "hello")
    shutil.copy(PROGRAMS / "authoring_folded.c", project / "hello.c")
    (project / "patches" / "my_patch.c").write_text(FOLDED_PATCH)
    build = setup_and_compile(project, "-Doptimization=2")
    dumps = list((build / "hello.p").glob("*.000i.ipa-clones"))
    assert [d.name for d in dumps] == ["hello.c.c.000i.ipa-clones"]
    done = meson("compile", "-C", "build", "patches", cwd=project)
    assert "patching scale may not reach all of its code" in done.stdout
    assert "-fdump-ipa-clones says it was inlined into limit" in done.stdout


@pytest.mark.slow
def test_a_snippet_of_an_older_release_still_builds_its_patches(tmp_path: Path) -> None:
    # meson.build files written before --depfile and --place: the generator finds the patch's
    # compile line in the build folder's compile_commands.json (from -o's folder) all the
    # same, and the patch works unplaced (through a trampoline).
    project = copy_example("hello", tmp_path / "hello")
    build = project / "meson.build"
    old = build.read_text().replace(
        "    depfile: name + '_reg.d',        # the patch's headers, its compile line\n", "").replace(
        "output: [name + '_reg.c', name + '_place.h'],", "output: name + '_reg.c',").replace(
        "'-o', '@OUTPUT0@',\n              '--place', '@OUTPUT1@', '--depfile', '@DEPFILE@']",
        "'-o', '@OUTPUT@']").replace(
        "    c_args: ['-include', reg[1].full_path()],  # replacements placed for a direct jump\n", "")
    assert "--depfile" not in old and "--place" not in old and "'-o', '@OUTPUT@']" in old
    assert "_place.h" not in old and "full_path" not in old
    build.write_text(old)
    setup_and_compile(project)
    meson("compile", "-C", "build", "patches", cwd=project)
    patched = run(project / "build" / "hello",
                  {"FENTRY_PATCHES": str(project / "build" / "my_patch.so")})
    assert patched.stdout == "my_patch: 123\n"
