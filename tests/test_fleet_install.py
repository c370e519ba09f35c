"""The patch directory (docs/fleet.md): fentry-build install / uninstall, with the real CLI,
real patch files and real running processes."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from support import fleet
from support.builds import ServerBuild
from support.cli import assert_one_error_line, cli
from support.fleet import json_lines
from support.servers import Server, assert_buggy, assert_fixed, start_server

from fentry_build.binary.patchinfo import read_patch
from fentry_build.client import control
from fentry_build.fleet import patchdir


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ServerBuild:
    """The server example's builds for these tests only, with build-ids of their own (install
    --apply reaches every process of a build on the machine)."""
    return fleet.server_build(tmp_path_factory)


def _install(pdir: Path, *args: str) -> tuple[int, list[dict[str, object]], str]:
    out = cli("install", *args, "--json", env_extra={"FENTRY_PATCH_DIR": str(pdir)})
    return out.returncode, json_lines(out.stdout), out.stderr


def test_install_writes_the_build_folder_atomically_and_once(built: ServerBuild, tmp_path: Path) -> None:
    pdir = tmp_path / "patches"
    fix = built.patches["fix_parse"]
    info = read_patch(fix)
    rc, lines, err = _install(pdir, str(fix))
    assert rc == 0, err
    final = pdir / info.build_id / "fix_parse.so"
    assert lines == [{"op": "install", "ok": True, "dry_run": False, "name": "fix_parse",
                      "build_id": info.build_id, "sha256": info.sha256, "path": str(final),
                      "changed": True, "previous": None}]
    assert final.read_bytes() == fix.read_bytes()
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
    for folder in (pdir, pdir / info.build_id):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    inode = final.stat().st_ino

    # The same version again: nothing is written.
    rc, lines, _ = _install(pdir, str(fix))
    assert rc == 0 and lines[0]["changed"] is False and final.stat().st_ino == inode

    # Another version under the same name replaces it by rename: a reader of the old file
    # (a process starting meanwhile) keeps reading the old bytes, whole.
    v2 = tmp_path / "v2" / "fix_parse.so"
    v2.parent.mkdir()
    shutil.copyfile(built.patches["fix_parse_v2"], v2)
    with open(final, "rb") as reader:
        rc, lines, err = _install(pdir, str(v2))
        assert rc == 0, err
        assert lines[0]["changed"] is True and lines[0]["previous"] == info.sha256
        assert lines[0]["sha256"] == read_patch(v2).sha256
        assert reader.read() == fix.read_bytes()
    assert final.stat().st_ino != inode and final.read_bytes() == v2.read_bytes()
    assert sorted(p.name for p in final.parent.iterdir()) == ["fix_parse.so"]  # no temporary left

    text = cli("install", str(v2), env_extra={"FENTRY_PATCH_DIR": str(pdir)})
    assert text.stdout.startswith("fix_parse version ") and "is installed already" in text.stdout


def test_install_refuses_what_the_shim_would_not_load(built: ServerBuild, tmp_path: Path) -> None:
    fix = built.patches["fix_parse"]
    pdir = tmp_path / "patches"
    env = {"FENTRY_PATCH_DIR": str(pdir)}
    assert_one_error_line(cli("install", str(built.binary), env_extra=env), "is not a fentry patch")
    assert not pdir.exists()
    assert_one_error_line(cli("install", str(fix), env_extra={"FENTRY_PATCH_DIR": "rel/dir"}),
                          "FENTRY_PATCH_DIR=rel/dir is not an absolute path")
    pdir.mkdir(mode=0o777)
    os.chmod(pdir, 0o777)
    out = cli("install", str(fix), env_extra=env)
    assert_one_error_line(out, f"{pdir} is writable by group or others (mode 0777)", "chmod go-w")
    assert list(pdir.iterdir()) == []
    os.chmod(pdir, 0o755)
    real = tmp_path / "elsewhere"
    real.mkdir()
    (pdir / read_patch(fix).build_id).symlink_to(real)
    assert_one_error_line(cli("install", str(fix), env_extra=env), "is a symbolic link")
    assert list(real.iterdir()) == []


def test_uninstall_removes_from_every_build_or_one(built: ServerBuild, tmp_path: Path) -> None:
    pdir = tmp_path / "patches"
    env = {"FENTRY_PATCH_DIR": str(pdir)}
    mine, other = built.patches["fix_parse"], built.other_fix
    for patch in (mine, other):
        assert _install(pdir, str(patch))[0] == 0
    one = cli("uninstall", "fix_parse", "--build-id", read_patch(other).build_id, env_extra=env)
    assert one.returncode == 0, one.stderr
    assert one.stdout == f"removed {pdir / read_patch(other).build_id / 'fix_parse.so'}\n"
    assert (pdir / read_patch(mine).build_id / "fix_parse.so").exists()
    dry = cli("uninstall", "fix_parse.so", "--dry-run", "--json", env_extra=env)
    assert json_lines(dry.stdout)[0]["changed"] is True
    assert (pdir / read_patch(mine).build_id / "fix_parse.so").exists()
    assert cli("uninstall", "fix_parse.so", env_extra=env).returncode == 0
    assert not (pdir / read_patch(mine).build_id / "fix_parse.so").exists()
    gone = cli("uninstall", "fix_parse", env_extra=env)
    assert_one_error_line(gone, f"fix_parse.so is not installed under {pdir}")
    fine = cli("uninstall", "fix_parse", "--if-installed", "--json", env_extra=env)
    assert fine.returncode == 0 and json_lines(fine.stdout)[0]["changed"] is False
    assert_one_error_line(cli("uninstall", "../x", env_extra=env), "'../x' is not a patch name")


def test_install_apply_patches_the_running_processes_of_that_build(
        built: ServerBuild, started: list[Server], tmp_path: Path) -> None:
    a, b, other = (start_server(binary, "jump") for binary in
                   (built.binary, built.binary, built.other_binary))
    started += [a, b, other]
    pdir = tmp_path / "patches"
    fix = built.patches["fix_parse"]
    info = read_patch(fix)
    rc, lines, err = _install(pdir, str(fix), "--apply")
    assert rc == 0, err
    assert lines[0]["op"] == "install" and lines[0]["changed"] is True
    assert sorted(int(str(line["pid"])) for line in lines[1:]) == sorted([a.pid, b.pid])
    assert all(line["ok"] and line["changed"] for line in lines[1:])
    for srv in (a, b):
        assert_fixed(srv)
        (patch,) = control.list_patches(srv.pid)["patches"]
        # The processes load the installed file itself: what a process started later loads.
        assert patch["path"] == str(pdir / info.build_id / "fix_parse.so")
    assert_buggy(other)
    # Again: nothing to write, nothing to apply.
    rc, lines, _ = _install(pdir, str(fix), "--apply")
    assert rc == 0 and [line["changed"] for line in lines] == [False, False, False]

    out = cli("uninstall", "fix_parse", "--revert", env_extra={"FENTRY_PATCH_DIR": str(pdir)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"removed {pdir / info.build_id / 'fix_parse.so'}"
    assert sorted(out.stdout.splitlines()[1:]) == sorted(f"pid {s.pid}: reverted fix_parse" for s in (a, b))
    assert_buggy(a)
    assert_buggy(b)


@pytest.mark.parametrize("env, euid, want", [
    ({"FENTRY_PATCH_DIR": "/srv/p", "XDG_DATA_HOME": "/x"}, 1000, "/srv/p"),
    ({"XDG_DATA_HOME": "/x", "HOME": "/home/u"}, 0, "/var/lib/fentry"),
    ({"XDG_DATA_HOME": "/x", "HOME": "/home/u"}, 1000, "/x/fentry"),
    ({"XDG_DATA_HOME": "relative", "HOME": "/home/u"}, 1000, "/home/u/.local/share/fentry"),
    ({"HOME": "/home/u"}, 1000, "/home/u/.local/share/fentry"),
])
def test_the_patch_directory_rule(env: dict[str, str], euid: int, want: str) -> None:
    assert patchdir.patch_dir(env, euid) == Path(want)


def test_a_process_started_after_install_comes_up_patched(built: ServerBuild, started: list[Server],
                                                          tmp_path: Path) -> None:
    pdir = tmp_path / "patches"
    fix = built.patches["fix_parse"]
    info = read_patch(fix)
    assert _install(pdir, str(fix))[0] == 0
    # The build's folder, as the runtime reads it at start (here named in FENTRY_PATCHES,
    # which loads a folder's *.so in name order before main).
    folder = pdir / info.build_id
    srv = start_server(built.binary, "jump", extra_env={"FENTRY_PATCHES": str(folder)})
    started.append(srv)
    assert_fixed(srv)
    (patch,) = control.list_patches(srv.pid)["patches"]
    assert (patch["name"], patch["state"], patch["path"]) == ("fix_parse", "active",
                                                             str(folder / "fix_parse.so"))
    assert patch["sha256"] == info.sha256
    # ps agrees: nothing is missing; a later install --apply changes nothing there.
    assert cli("ps", "--missing", str(fix)).returncode == 0
    rc, lines, _ = _install(pdir, str(fix), "--apply")
    assert rc == 0 and [line["changed"] for line in lines] == [False, False]
