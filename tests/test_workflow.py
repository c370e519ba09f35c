"""The production workflow (docs/workflow.md): released builds archived by build-id, patches
built for the build that runs, apply's advice when they are not, a corrected version applied
over the first - with real gcc, Meson, SCons, processes and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fentry_build import paths
from fentry_build.binary.elf import read_build_id

from support.builds import EXAMPLE, PROGRAMS, ServerBuild, copy_example, run
from support.cli import cli, python
from support.servers import Server, assert_buggy, assert_fixed, assert_v2, start

FIX_PARSE = EXAMPLE / "patches" / "fix_parse.c"
FIX_PARSE_V2 = EXAMPLE / "patches" / "fix_parse_v2.c"
ADVICE = "; to build it for the running one and apply it: "


def build_id(binary: Path) -> str:
    found = read_build_id(binary)
    assert found is not None, binary
    return found.hex()


def shell(command: str, cwd: Path | str) -> subprocess.CompletedProcess[str]:
    """A command line as a user types it (fentry-build, meson, scons from this environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc


def link_patch(source: Path, registration: Path, out: Path) -> Path:
    run(["gcc", "-O2", "-shared", "-fPIC", f"-I{paths.include_dir()}", f"-I{EXAMPLE}", "-o",
         str(out), str(source), str(registration)])
    out.chmod(0o755)
    return out


def deploy(binary: Path, folder: Path) -> Path:
    """A copy of the program where it runs (a rebuild of the tree never touches it)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / binary.name
    shutil.copy2(binary, copy)
    return copy


# ---- the archive ----------------------------------------------------------------------------


def test_archive_keeps_each_build_once_under_its_build_id(built: ServerBuild, tmp_path: Path) -> None:
    store = tmp_path / "store"
    v1, v2 = build_id(built.binary), build_id(built.other_binary)
    first = cli("archive", str(built.binary), "--store", str(store))
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert first.stdout.startswith(f"archived server (build-id {v1}): {store / v1 / 'server'}")
    entry = store / v1
    assert (entry / "server").read_bytes() == built.binary.read_bytes()
    info = json.loads((entry / "build.json").read_text())
    assert info["build_id"] == v1 and info["program"] == "server" and info["has_dwarf"] is True
    assert info["size"] == built.binary.stat().st_size and info["source"] == str(built.binary)

    again = cli("archive", str(built.binary), "--store", str(store), "--json")
    assert again.returncode == 0
    assert [(r["build_id"], r["new"]) for r in json.loads(again.stdout)] == [(v1, False)]
    assert sorted(p.name for p in store.iterdir()) == [v1]  # nothing half-written left behind

    assert cli("archive", str(built.other_binary), "--store", str(store)).returncode == 0
    listed = cli("archive", "--list", "--json", "--store", str(store))
    rows = json.loads(listed.stdout)
    assert [(r["build_id"], r["program"]) for r in rows] == [(v1, "server"), (v2, "server")]
    text = cli("archive", "--list", "--store", str(store)).stdout.splitlines()
    assert [line.split()[0] for line in text] == [v1, v2] and all("server" in line for line in text)


def test_archive_refuses_a_binary_without_build_id(tmp_path: Path) -> None:
    prog = tmp_path / "noid"
    run(["gcc", "-g", "-o", str(prog), str(PROGRAMS / "compute.c"), "-Wl,--build-id=none"])
    result = cli("archive", str(prog), "--store", str(tmp_path / "store"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "has no GNU build-id" in result.stderr
    assert "-Wl,--build-id" in result.stderr
    assert not (tmp_path / "store").exists()


def test_archive_warns_about_a_binary_without_dwarf(tmp_path: Path) -> None:
    prog = tmp_path / "nodwarf"
    run(["gcc", "-g0", "-o", str(prog), str(PROGRAMS / "compute.c"), "-Wl,--build-id=sha1"])
    store = tmp_path / "store"
    result = cli("archive", str(prog), "--store", str(store))
    assert result.returncode == 0
    assert "has no DWARF (-g)" in result.stderr and "has no fentry sites" in result.stderr
    assert (store / build_id(prog) / "nodwarf").is_file()
    assert "(no DWARF)" in cli("archive", "--list", "--store", str(store)).stdout


def test_the_store_is_the_option_the_variable_or_the_projects(built: ServerBuild,
                                                              tmp_path: Path) -> None:
    v1 = build_id(built.binary)
    env_store = tmp_path / "from-env"
    assert cli("archive", str(built.binary), env_extra={"FENTRY_STORE": str(env_store)}).returncode == 0
    assert (env_store / v1 / "server").is_file()
    project = tmp_path / "project"
    (project / "out").mkdir(parents=True)
    (project / "meson.build").write_text("project('p', 'c')\n")
    shutil.copy2(built.binary, project / "out" / "server")
    assert cli("archive", str(project / "out" / "server")).returncode == 0
    assert (project / ".fentry" / "builds" / v1 / "server").is_file()
    nowhere = cli("archive", "--list")  # runs in /: no project there
    assert nowhere.returncode == 1 and "pass --store DIR or set FENTRY_STORE" in nowhere.stderr


# ---- the generator's targets ------------------------------------------------------------------


def test_generator_builds_for_an_archived_build_id(built: ServerBuild, tmp_path: Path,
                                                   started: list[Server]) -> None:
    store = tmp_path / "store"
    v1 = build_id(built.binary)
    assert cli("archive", str(built.binary), "--store", str(store)).returncode == 0
    srv = start(deploy(built.binary, tmp_path / "deploy"))
    started.append(srv)
    reg = tmp_path / "fix_parse_reg.c"
    # --binary is the tree's newer build; --build-id (a prefix) names the deployed one.
    gen = python("-m", "fentry_build.gen", "--binary", str(built.other_binary), "--build-id",
                 v1[:10], "--store", str(store), "--patch", str(FIX_PARSE), "-o", str(reg),
                 "--", "gcc", f"-I{EXAMPLE}")
    assert gen.returncode == 0, gen.stderr
    assert f"build-id: {v1}" in reg.read_text()
    patch = link_patch(FIX_PARSE, reg, tmp_path / "fix_parse.so")
    assert cli("apply", "--pid", str(srv.pid), str(patch)).returncode == 0
    assert_fixed(srv)
    unknown = python("-m", "fentry_build.gen", "--build-id", "deadbeef00", "--store", str(store),
                     "--patch", str(FIX_PARSE), "-o", str(tmp_path / "x.c"), "--", "gcc", f"-I{EXAMPLE}")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "no build deadbeef00 in the store" in unknown.stderr and v1[:12] in unknown.stderr


def test_generator_builds_for_what_a_process_runs_even_once_deleted(
        built: ServerBuild, tmp_path: Path, started: list[Server]) -> None:
    deployed = deploy(built.binary, tmp_path / "deploy")
    srv = start(deployed)
    started.append(srv)
    deployed.unlink()  # replaced on disk by an upgrade: the process still runs the old file
    assert os.readlink(f"/proc/{srv.pid}/exe").endswith(" (deleted)")
    reg = tmp_path / "fix_parse_reg.c"
    gen = python("-m", "fentry_build.gen", "--binary", f"/proc/{srv.pid}/exe", "--patch",
                 str(FIX_PARSE), "-o", str(reg), "--", "gcc", f"-I{EXAMPLE}")
    assert gen.returncode == 0, gen.stderr
    text = reg.read_text()
    assert "program:  server\n" in text and '.target = "server"' in text  # not "exe"
    assert f"build-id: {build_id(built.binary)}" in text
    patch = link_patch(FIX_PARSE, reg, tmp_path / "fix_parse.so")
    assert cli("apply", "--pid", str(srv.pid), str(patch)).returncode == 0
    assert_fixed(srv)
    archived = cli("archive", f"/proc/{srv.pid}/exe", "--store", str(tmp_path / "store"))
    assert archived.returncode == 0 and archived.stdout.startswith("archived server ")


def test_apply_outside_a_project_gives_both_build_systems_commands(
        built: ServerBuild, tmp_path: Path, started: list[Server]) -> None:
    srv = start(deploy(built.binary, tmp_path / "deploy"))
    started.append(srv)
    result = cli("apply", "--pid", str(srv.pid), str(built.other_fix))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    v1 = build_id(built.binary)
    assert "built for another build of server" in result.stderr and ADVICE in result.stderr
    advice = result.stderr.split(ADVICE, 1)[1]
    assert f"fentry-build archive /proc/{srv.pid}/exe" in advice
    assert f"meson configure BUILDDIR -Dfentry:target={v1}" in advice
    assert f"scons patches fentry_target={v1}" in advice
    assert_buggy(srv)


def test_apply_advice_starts_with_meson_init_for_a_subproject_without_the_target_option(
        built: ServerBuild, tmp_path: Path, started: list[Server]) -> None:
    # A project whose fentry subproject came from an older meson-init: no `target` option.
    project = tmp_path / "old"
    info = project / "build" / "meson-info"
    info.mkdir(parents=True)
    (project / "meson.build").write_text("project('server', 'c')\n")
    (info / "meson-info.json").write_text(json.dumps({"directories": {"source": str(project)}}))
    (info / "intro-buildoptions.json").write_text(json.dumps([{"name": "buildtype"}]))
    patch = project / "build" / "fix_parse.so"
    shutil.copy2(built.other_fix, patch)
    srv = start(deploy(built.binary, tmp_path / "deploy"))
    started.append(srv)
    advice = refused_with_advice(srv.pid, patch, running=build_id(built.binary),
                                 built_for=build_id(built.other_binary))
    assert advice.startswith(f"fentry-build meson-init {project} && fentry-build archive "
                             f"/proc/{srv.pid}/exe && meson configure {project / 'build'} ")


# ---- the whole cycle, as docs/workflow.md tells it ------------------------------------------------


def release_v2(project: Path) -> None:
    """The tree moves on: a source change, so the next build has another build-id."""
    src = project / "server.c"
    text = src.read_text()
    assert "#define IDLE_MS 60000" in text
    src.write_text(text.replace("#define IDLE_MS 60000", "#define IDLE_MS 30000"))


def refused_with_advice(pid: int, patch: Path, running: str, built_for: str) -> str:
    result = cli("apply", "--pid", str(pid), str(patch))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.strip()
    assert f"build-id {built_for}; the running program's is {running}" in line
    return line.split(ADVICE, 1)[1]


@pytest.mark.slow
def test_meson_cycle_release_deploy_patch_the_deployed_build_and_correct_it(
        tmp_path: Path, started: list[Server]) -> None:
    project = copy_example("server", tmp_path / "server")
    build = project / "build"
    shell("meson setup build >/dev/null && meson compile -C build >/dev/null && "
          "meson compile -C build archive", project)
    v1 = build_id(build / "server")
    assert (project / ".fentry" / "builds" / v1 / "server").is_file()
    srv = start(deploy(build / "server", tmp_path / "deploy"))
    started.append(srv)
    assert_buggy(srv)

    release_v2(project)
    shell("meson compile -C build >/dev/null && meson compile -C build patches >/dev/null", project)
    v2 = build_id(build / "server")
    assert v2 != v1
    command = refused_with_advice(srv.pid, build / "fix_parse.so", running=v1, built_for=v2)
    assert command == (f"meson configure {build} -Dfentry:target={v1} && meson compile -C "
                       f"{build} patches && fentry-build apply --pid {srv.pid} {build}/fix_parse.so")
    shell(command, "/")  # exactly as printed
    assert_fixed(srv)

    # A corrected version of the same patch, still built for v1, replaces the first.
    (project / "patches" / "fix_parse.c").write_text(FIX_PARSE_V2.read_text())
    shell(f"meson compile -C build patches >/dev/null && "
          f"fentry-build apply --pid {srv.pid} build/fix_parse.so", project)
    assert_v2(srv)
    patches = json.loads(cli("list", "--pid", str(srv.pid), "--json").stdout)["patches"]
    assert [(p["name"], p["state"]) for p in patches if p["state"] == "active"] == [("fix_parse", "active")]

    # Back to the tree: patches for the build folder's program again.
    shell("meson configure build -Dfentry:target= && meson compile -C build patches >/dev/null",
          project)
    assert f"build-id: {v2}" in (build / "fix_parse_reg.c").read_text()
    assert srv.alive()


@pytest.mark.slow
def test_scons_cycle_release_deploy_patch_the_deployed_build_and_correct_it(
        tmp_path: Path, started: list[Server]) -> None:
    pytest.importorskip("SCons")
    project = tmp_path / "server"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("build*", "subprojects"))
    shell("scons -Q >/dev/null && scons -Q archive", project)
    v1 = build_id(project / "server")
    assert (project / ".fentry" / "builds" / v1 / "server").is_file()
    srv = start(deploy(project / "server", tmp_path / "deploy"))
    started.append(srv)
    assert_buggy(srv)

    release_v2(project)
    shell("scons -Q >/dev/null && scons -Q patches >/dev/null", project)
    v2 = build_id(project / "server")
    assert v2 != v1
    command = refused_with_advice(srv.pid, project / "fix_parse.so", running=v1, built_for=v2)
    assert command == (f"cd {project} && scons patches fentry_target={v1} && "
                       f"fentry-build apply --pid {srv.pid} {project}/fix_parse.so")
    shell(command, "/")
    assert_fixed(srv)

    (project / "patches" / "fix_parse.c").write_text(FIX_PARSE_V2.read_text())
    shell(f"scons -Q patches fentry_target={v1[:12]} >/dev/null && "
          f"fentry-build apply --pid {srv.pid} fix_parse.so", project)
    assert_v2(srv)
    assert srv.alive()
