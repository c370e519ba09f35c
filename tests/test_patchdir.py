"""New processes start patched: the patch directory (issue 14 §3, the shim's side).

A process loads <dir>/<its build-id>/*.so before main, in name order, then FENTRY_PATCHES.
<dir> is FENTRY_PATCH_DIR, else /var/lib/fentry for root, else $XDG_DATA_HOME/fentry or
~/.local/share/fentry - the rule fentry_build.fleet.patchdir.rule() states.  Both
directories must be real ones of the process's user or root that nobody else can write.
Real server, both modes; uid nobody where the rule depends on the user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fentry_build.client import control
from fentry_build.fleet.patchdir import rule

from support.builds import ServerBuild
from support.cli import AS_NOBODY
from support.servers import (BUG_REQUEST, BUGGY, FIXED, LOWER, LOWER_OLD, LOWER_V2, MODES, ask,
                             start_server)


@pytest.fixture(scope="module")
def build_id(built: ServerBuild) -> str:
    srv = start_server(built.binary, "dispatch")
    try:
        bid = control.status(srv.pid)["build_id"]
    finally:
        srv.stop()
    assert isinstance(bid, str) and bid
    return bid


def install(patch: Path, root: Path, build_id: str, name: str | None = None) -> Path:
    d = root / build_id
    d.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    d.chmod(0o755)
    dest = d / (name or patch.name)
    shutil.copyfile(patch, dest)
    dest.chmod(0o644)
    return dest


class Started:
    """The server started with an environment of our choosing; its stderr kept."""

    def __init__(self, binary: Path, mode: str, **env: str) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
        full.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0", **env})
        self.proc = subprocess.Popen([str(binary), "0"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=full)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.mark.parametrize("mode", MODES)
def test_a_process_started_after_a_patch_was_installed_comes_up_patched(
        built: ServerBuild, build_id: str, tmp_path: Path, mode: str) -> None:
    root = tmp_path / "patches"
    install(built.patches["fix_parse"], root, build_id)
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
    try:
        assert ask(s.port, BUG_REQUEST) == FIXED and ask(s.port, LOWER) == LOWER_OLD
    finally:
        assert s.stop() == ""
    # Name order: fix_parse_v2.so sorts after fix_parse.so, so it is on top; and
    # FENTRY_PATCHES comes after the directory.
    install(built.patches["fix_parse_v2"], root, build_id)
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
    try:
        assert ask(s.port, LOWER) == LOWER_V2
    finally:
        assert s.stop() == ""
    (root / build_id / "fix_parse_v2.so").rename(root / build_id / "0_fix_parse_v2.so")
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
    try:
        assert ask(s.port, LOWER) == LOWER_OLD  # 0_… first, fix_parse on top of it
    finally:
        assert s.stop() == ""
    # Another build's folder is not this program's.
    shutil.rmtree(root / build_id)
    install(built.patches["fix_parse"], root, "0" * len(build_id))
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
    try:
        assert ask(s.port, BUG_REQUEST) == BUGGY
    finally:
        assert s.stop() == ""


@pytest.mark.parametrize("mode", MODES)
def test_a_patch_directory_others_could_write_is_not_used(
        built: ServerBuild, build_id: str, tmp_path: Path, mode: str) -> None:
    root = tmp_path / "patches"
    install(built.patches["fix_parse"], root, build_id)
    cases: list[tuple[str, Path, str]] = []
    (root / build_id).chmod(0o775)
    cases.append(("group-writable build folder", root,
                  f"fentry: patch directory {root / build_id} not used: writable by group or "
                  "others (mode 775); chmod go-w it\n"))
    for why, where, expected in cases:
        s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(where))
        try:
            assert ask(s.port, BUG_REQUEST) == BUGGY, why
        finally:
            assert s.stop() == expected, why
    (root / build_id).chmod(0o755)
    root.chmod(0o757)
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
    try:
        assert ask(s.port, BUG_REQUEST) == BUGGY
    finally:
        assert s.stop() == (f"fentry: patch directory {root} not used: writable by group or "
                            "others (mode 757); chmod go-w it\n")
    root.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(root)
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(link))
    try:
        assert ask(s.port, BUG_REQUEST) == BUGGY
    finally:
        assert s.stop() == (f"fentry: patch directory {link} not used: not a real directory "
                            "(a symbolic link?)\n")
    s = Started(built.binary, mode, FENTRY_PATCH_DIR="relative/dir")
    try:
        assert ask(s.port, BUG_REQUEST) == BUGGY
    finally:
        assert s.stop() == ("fentry: FENTRY_PATCH_DIR=relative/dir is not an absolute path; "
                            "no patch directory is loaded\n")
    if os.geteuid() == 0:
        os.chown(root / build_id, 65534, 65534)
        s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
        try:
            assert ask(s.port, BUG_REQUEST) == BUGGY
        finally:
            assert s.stop() == (f"fentry: patch directory {root / build_id} not used: owned by "
                                "uid 65534, not by this process's uid 0 or root\n")
        os.chown(root / build_id, 0, 0)
    # A bad file in a good folder: that file is refused in one line, the others load.
    install(built.other_fix, root, build_id, "0_other_build.so")
    s = Started(built.binary, mode, FENTRY_PATCH_DIR=str(root))
    try:
        assert ask(s.port, BUG_REQUEST) == FIXED
    finally:
        err = s.stop()
    assert err.count("\n") == 1 and err.startswith(
        f"fentry: patch {root / build_id / '0_other_build.so'} not loaded: patch 0_other_build "
        "was built for another build"), err


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder in /tmp that uid nobody may read and traverse (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="fpdir-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.needs_nobody
@pytest.mark.parametrize("where", ["xdg", "home"])
def test_a_user_process_uses_the_directory_the_rule_names(
        built: ServerBuild, build_id: str, public_dir: Path, where: str) -> None:
    """As uid nobody: $XDG_DATA_HOME/fentry, else ~/.local/share/fentry - where
    fentry_build.fleet.patchdir.rule() says (the rule the shim follows)."""
    binary = public_dir / "server"
    shutil.copyfile(built.binary, binary)
    binary.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "FENTRY_CONTROL": "0", "HOME": str(public_dir / "home")}
    if where == "xdg":
        env["XDG_DATA_HOME"] = str(public_dir / "xdg")
    root = rule(env, 65534)
    assert root is not None
    assert root == (public_dir / "xdg" / "fentry" if where == "xdg"
                    else public_dir / "home" / ".local" / "share" / "fentry")
    install(built.patches["fix_parse"], root, build_id)
    for p in [root, *root.parents]:
        if p == public_dir:
            break
        p.chmod(0o755)
    proc = subprocess.Popen([*AS_NOBODY, str(binary), "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd="/")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        assert ask(int(line.rsplit(":", 1)[1]), BUG_REQUEST) == FIXED
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert err == ""


def test_the_rule_for_root_and_for_programs_that_ignore_their_environment() -> None:
    assert rule({}, 0) == Path("/var/lib/fentry")
    assert rule({"FENTRY_PATCH_DIR": "/srv/p"}, 0) == Path("/srv/p")
    assert rule({"FENTRY_PATCH_DIR": "rel"}, 1000) is None
    assert rule({}, 1000) is None
    assert rule({"FENTRY_PATCH_DIR": "/srv/p"}, 0, secure=True) == Path("/var/lib/fentry")
    assert rule({"HOME": "/home/u", "XDG_DATA_HOME": "/x"}, 1000, secure=True) is None
