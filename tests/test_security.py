"""Who may patch a process, and which files it accepts as patches.

The server example runs (jump mode and dispatch mode) and is attacked through its control
socket: clients of another uid (uid nobody, through setpriv), patch files that are
writable by others, owned by another user, symlinks, directories, FIFOs, on a noexec
mount, for another architecture or another build - and files swapped for an evil one
while apply runs.  Each is refused with one line that says why, and the target stays
alive and unchanged.  The threat model these tests check is docs/security.md.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import fentry_build
from fentry_build.binary.elf import read_binary
from fentry_build.client import control
from fentry_build.errors import FentryError

from support.builds import ServerBuild, run
from support.cli import CLI, NOBODY, assert_one_error_line
from support.servers import (
    MODES,
    Server,
    assert_buggy,
    assert_fixed,
    assert_stops_cleanly,
    figures,
    patch_states,
    start_server,
)

EM_AARCH64 = 183

needs_root = pytest.mark.needs_root
needs_nobody = pytest.mark.needs_nobody


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder in /tmp that uid nobody may read and traverse (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="fsec-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def refused(srv: Server, path: Path | str) -> str:
    """Send a load request for `path` as it is (no client-side checks): its one-line error."""
    reply = control.request(srv.pid, {"op": "load", "path": str(path)}, timeout=60)
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error, str) and "\n" not in error and "\r" not in error
    return error


def assert_unchanged(srv: Server) -> None:
    assert srv.alive()
    assert patch_states(srv) == {}
    assert control.status(srv.pid)["patches_active"] == 0
    assert_buggy(srv)


# ---- the control socket: same uid or root only ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_socket_folder_and_file_belong_to_the_user_and_nobody_else(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    sock = control.socket_path(srv.pid)
    folder, me = os.lstat(sock.parent), os.geteuid()
    assert stat.S_ISDIR(folder.st_mode) and folder.st_uid == me
    assert folder.st_mode & 0o022 == 0, oct(folder.st_mode)  # nobody else can add or swap files
    st = os.lstat(sock)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == me and stat.S_IMODE(st.st_mode) == 0o600
    assert_stops_cleanly(srv)
    assert not sock.exists()


def _python_for_nobody(public: Path) -> tuple[str, dict[str, str]]:
    """An interpreter uid nobody can run, importing a copy of fentry_build it can read."""
    shutil.copytree(Path(fentry_build.__file__).resolve().parent, public / "fentry_build",
                    ignore=shutil.ignore_patterns("__pycache__", "data"))
    for p in [public, *public.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(public), "PYTHONDONTWRITEBYTECODE": "1"}
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and subprocess.run(
                [*as_nobody(), candidate, "-c", "import fentry_build.cli"], env=env,
                capture_output=True, timeout=30, cwd="/").returncode == 0:
            return candidate, env
    pytest.skip("no Python that uid nobody can run (the venv under /root is private)")


def as_nobody() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@needs_nobody
@pytest.mark.parametrize("mode", MODES)
def test_a_client_of_another_uid_is_refused(built: ServerBuild, started: list[Server],
                                           public_dir: Path, mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    python, env = _python_for_nobody(public_dir)
    patch = public_dir / "fix_parse.so"
    shutil.copyfile(built.patches["fix_parse"], patch)
    patch.chmod(0o644)
    for verb in (["apply", "--pid", str(srv.pid), str(patch)], ["list", "--pid", str(srv.pid)],
                 ["revert", "--pid", str(srv.pid), "fix_parse"]):
        result = subprocess.run([*as_nobody(), python, "-m", "fentry_build", *verb], env=env,
                                capture_output=True, text=True, timeout=60, cwd="/")
        assert result.stdout == ""
        assert_one_error_line(result, "permission denied")
    assert_unchanged(srv)
    assert_stops_cleanly(srv)


NOBODY_CLIENT = r'''
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in json.loads(sys.argv[2])))
except (BrokenPipeError, ConnectionResetError):
    pass  # refused and closed already: the reply is waiting
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print(data.decode())
'''


@needs_nobody
@pytest.mark.parametrize("mode", MODES)
def test_peer_credentials_refuse_another_uid_even_through_an_open_socket_file(
        built: ServerBuild, started: list[Server], public_dir: Path, mode: str) -> None:
    """Folder 0755 and socket 0666 (a careless admin): SO_PEERCRED still refuses nobody."""
    rundir = public_dir / "run"
    rundir.mkdir(mode=0o755)
    srv = start_server(built.binary, mode, {"FENTRY_RUNTIME_DIR": str(rundir)})
    started.append(srv)
    sock = rundir / f"{srv.pid}.sock"
    sock.chmod(0o666)
    requests = [{"op": "load", "path": str(built.patches["fix_parse"])}, {"op": "status"}]
    result = subprocess.run([*as_nobody(), "/usr/bin/python3", "-c", NOBODY_CLIENT, str(sock),
                             json.dumps(requests)], capture_output=True, text=True, timeout=30,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    # One refusal, then the connection is closed: no request of it is carried out.
    assert replies == [{"ok": False, "code": "not_permitted",
                        "error": f"permission denied: uid {NOBODY} may not control "
                        f"process {srv.pid} (uid {os.geteuid()})"}]
    assert_unchanged(srv)
    assert_stops_cleanly(srv)


# ---- patch files that are refused -----------------------------------------------------------


def _copy(src: Path, dst: Path, mode: int = 0o644) -> Path:
    shutil.copyfile(src, dst)
    dst.chmod(mode)
    return dst


@pytest.fixture(scope="module")
def noexec_dir() -> Iterator[Path | str]:
    """A tmpfs mounted noexec, or why there is none."""
    d = Path(tempfile.mkdtemp(prefix="fsec-noexec-", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,mode=0755", "tmpfs", str(d)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        yield f"mount -t tmpfs -o noexec is not permitted here: {mounted.stderr.strip()}"
    else:
        yield d
        subprocess.run(["umount", str(d)], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _plain_shared_object(tmp: Path, marker: Path, *, claims_to_be_a_patch: bool = False) -> Path:
    """A .so whose constructor writes its euid to `marker`; no fentry descriptor, or (with
    `claims_to_be_a_patch`) a dynamic symbol `fentry_patch` that is not one."""
    src = tmp / "plain.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\n'
                   '__attribute__((constructor)) static void ran(void)\n'
                   f'{{ FILE *f = fopen("{marker}", "w");\n'
                   '  if (f) { fprintf(f, "euid=%d\\n", (int)geteuid()); fclose(f); } }\n'
                   + ("int fentry_patch[8];\n" if claims_to_be_a_patch else ""))
    out = tmp / "plain.so"
    run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)])
    out.chmod(0o755)
    return out


def make_refused_file(kind: str, built: ServerBuild, tmp: Path, noexec: Path | str) -> tuple[Path | str, str]:
    """A patch path of `kind` and the fragment of the loader's one-line refusal."""
    fix = built.patches["fix_parse"]
    p = tmp / "fix_parse.so"
    if kind == "group-writable":
        return _copy(fix, p, 0o664), "writable by group or others (mode 664); chmod go-w it"
    if kind == "world-writable":
        return _copy(fix, p, 0o646), "writable by group or others (mode 646); chmod go-w it"
    if kind == "owned by another user":
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(_copy(fix, p), NOBODY, NOBODY)
        return p, f"owned by uid {NOBODY}, not by this process's uid {os.geteuid()} or root"
    if kind == "symlink":
        p.symlink_to(fix)
        return p, "is a symbolic link; pass the path of the file itself"
    if kind == "directory":
        p.mkdir()
        return p, "not a regular file"
    if kind == "fifo":
        os.mkfifo(p)
        return p, "not a regular file"
    if kind == "noexec mount":
        if isinstance(noexec, str):
            pytest.skip(noexec)
        return (_copy(fix, noexec / "fix_parse.so"),
                "on a file system mounted noexec, where nothing may be executed")
    if kind == "another architecture":
        data = bytearray(fix.read_bytes())
        data[18:20] = EM_AARCH64.to_bytes(2, "little")  # e_machine
        p.write_bytes(bytes(data))
        p.chmod(0o644)
        return p, "not an x86-64 shared object"
    if kind == "another build":
        return built.other_fix, "was built for another build of server"
    if kind == "truncated":
        p.write_bytes(fix.read_bytes()[: fix.stat().st_size // 2])
        p.chmod(0o644)
        return p, "truncated"
    if kind == "not ELF":
        p.write_text("#!/bin/sh\necho not a patch\n")
        p.chmod(0o755)
        return p, "not an ELF file"
    if kind == "relative path":
        return "fix_parse.so", "the path must be absolute"
    if kind == "missing":
        return p, "cannot open: No such file or directory"
    raise AssertionError(kind)


REFUSED_KINDS = ["group-writable", "world-writable", "owned by another user", "symlink",
                 "directory", "fifo", "noexec mount", "another architecture", "another build",
                 "truncated", "not ELF", "relative path", "missing"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", REFUSED_KINDS)
def test_a_patch_file_that_must_not_be_loaded_is_refused_with_one_line(
        built: ServerBuild, started: list[Server], tmp_path: Path, noexec_dir: Path | str,
        kind: str, mode: str) -> None:
    path, why = make_refused_file(kind, built, tmp_path, noexec_dir)
    srv = start_server(built.binary, mode)
    started.append(srv)
    error = refused(srv, path)
    assert why in error, (kind, error)
    if kind == "another build":  # both build-ids, so the user knows which is which
        assert "build-id" in error and "rebuild the patch against the running binary" in error
    if kind not in ("relative path", "directory", "fifo", "missing"):  # the CLI checks those itself
        result = subprocess.run([*CLI, "apply", "--pid", str(srv.pid), str(path)],
                                capture_output=True, text=True, timeout=60)
        assert_one_error_line(result, why)
    assert_unchanged(srv)
    control.apply(srv.pid, built.patches["fix_parse"])  # the real one still applies
    assert_fixed(srv)
    assert_stops_cleanly(srv)


@pytest.mark.parametrize("mode", MODES)
def test_a_shared_object_without_a_descriptor_is_refused_before_its_constructor_runs(
        built: ServerBuild, started: list[Server], tmp_path: Path, mode: str) -> None:
    """Its dynamic symbols are read from the private copy before dlopen()."""
    marker = tmp_path / "constructor_ran"
    plain = _plain_shared_object(tmp_path, marker)
    srv = start_server(built.binary, mode)
    started.append(srv)
    assert (f"{plain}: not a fentry patch: its dynamic symbols define no fentry_patch; build "
            "patches with the fentry generator") in refused(srv, plain)
    assert not marker.exists()
    assert_unchanged(srv)
    assert_stops_cleanly(srv)


@pytest.mark.parametrize("mode", MODES)
def test_a_shared_object_claiming_to_be_a_patch_is_refused_after_its_constructor_ran(
        built: ServerBuild, started: list[Server], tmp_path: Path, mode: str) -> None:
    """The documented trust boundary: dlopen() runs constructors before the descriptor
    can be validated."""
    marker = tmp_path / "constructor_ran"
    plain = _plain_shared_object(tmp_path, marker, claims_to_be_a_patch=True)
    srv = start_server(built.binary, mode)
    started.append(srv)
    assert "descriptor ABI version 0" in refused(srv, plain)
    assert marker.exists()
    assert_unchanged(srv)
    assert_stops_cleanly(srv)


@pytest.mark.parametrize("mode", MODES)
def test_the_folder_of_a_patch_is_not_checked(built: ServerBuild, started: list[Server],
                                              public_dir: Path, mode: str) -> None:
    """Documented: a good file in a world-writable folder is loaded (who can write the
    folder can replace the file before apply - not between check and load)."""
    folder = public_dir / "open"
    folder.mkdir()
    folder.chmod(0o777)
    patch = _copy(built.patches["fix_parse"], folder / "fix_parse.so")
    srv = start_server(built.binary, mode)
    started.append(srv)
    control.apply(srv.pid, patch)
    assert_fixed(srv)
    assert_stops_cleanly(srv)


# ---- swapping files while apply runs -------------------------------------------------------

RACE_APPLIES = 200
# A loaded machine can let one outcome of the race (load or refusal) win every time for a
# while: the runs go on until both were seen, up to this many - a bound, not a speed.
RACE_APPLIES_MAX = 10 * RACE_APPLIES
REASON_KEYS = {"is a symbolic link": "symlink", "writable by group or others": "writable"}


class Swapper:
    """A thread that keeps replacing `target` (atomically, rename) by each of `entries`."""

    def __init__(self, target: Path, entries: list[Path]) -> None:
        self.target, self.entries = target, entries
        self.stop = threading.Event()
        self.swaps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            entry = self.entries[i % len(self.entries)]
            tmp = self.target.with_name(f".swap{i % 2}")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            if entry.is_symlink():
                tmp.symlink_to(os.readlink(entry))
            else:
                os.link(entry, tmp)  # the same inode: the loader can recognise it
            os.replace(tmp, self.target)
            self.swaps += 1
            i += 1

    def __enter__(self) -> Swapper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _apply_while_swapping(srv: Server, path: Path, marker: Path, swapper: Swapper,
                          allowed: tuple[str, ...]) -> Counter[str]:
    outcome: Counter[str] = Counter()

    def both_seen() -> bool:
        return outcome["loaded_good"] > 0 and any(k.startswith("refused") for k in outcome)

    with swapper:
        for applies in range(1, RACE_APPLIES_MAX + 1):
            if applies > RACE_APPLIES and both_seen():
                break
            reply = control.request(srv.pid, {"op": "load", "path": str(path)}, timeout=60)
            if reply["ok"]:
                outcome["loaded_good"] += 1
                assert_fixed(srv)  # never "ERR rel_evil_patch ran"
                control.revert(srv.pid, "rel_race")
                for _ in range(50):  # unload, so the next apply opens and loads afresh
                    try:
                        control.unload(srv.pid, "rel_race")
                        break
                    except FentryError as e:
                        assert "busy" in str(e), e
                        time.sleep(0.01)
            else:
                reason = next((a for a in allowed if a in reply["error"]), None)
                assert reason is not None, reply
                outcome["refused_" + REASON_KEYS.get(reason, "owner")] += 1
            assert not marker.exists(), "the evil patch's constructor ran"
    outcome["swaps"] = swapper.swaps
    outcome["applies"] = sum(v for k, v in outcome.items() if k != "swaps")
    return outcome


@needs_root
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.stress  # a race, run hundreds of times
def test_swapping_the_file_during_apply_never_loads_the_evil_one(
        built: ServerBuild, started: list[Server], tmp_path: Path, mode: str) -> None:
    marker = tmp_path / "evil_ran"
    d = tmp_path / "race"
    d.mkdir()
    good = _copy(built.patches["fix_parse"], d / "good.so")
    evil = _copy(built.patches["rel_evil_patch"], d / "evil.so")   # 0644, root's: loadable ...
    evil_link = d / "evil_link"
    evil_link.symlink_to(evil)                                       # ... but only via a symlink
    evil_ww = _copy(built.patches["rel_evil_patch"], d / "evil_ww.so", 0o646)
    evil_nobody = _copy(built.patches["rel_evil_patch"], d / "evil_nobody.so")
    os.chown(evil_nobody, NOBODY, NOBODY)
    target = d / "rel_race.so"
    os.link(good, target)
    srv = start_server(built.binary, mode, {"REL_EVIL_MARKER": str(marker)})
    started.append(srv)
    outcome = _apply_while_swapping(
        srv, target, marker, Swapper(target, [good, evil_link, good, evil_ww, good, evil_nobody]),
        ("is a symbolic link", "writable by group or others", f"owned by uid {NOBODY}"))
    figures(f"file swap race ({mode})", **outcome)
    assert outcome["loaded_good"] > 0 and sum(
        v for k, v in outcome.items() if k.startswith("refused")) > 0
    assert not marker.exists()
    assert_stops_cleanly(srv)


@needs_root
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.stress  # a race, run hundreds of times
def test_swapping_the_folder_during_apply_never_loads_the_evil_file(
        built: ServerBuild, started: list[Server], tmp_path: Path, mode: str) -> None:
    """The folder is not checked (a symlinked folder is followed), but the file reached
    through it is checked and loaded through the same descriptor."""
    marker = tmp_path / "evil_ran"
    d = tmp_path / "race"
    (d / "good").mkdir(parents=True)
    (d / "evil_ww").mkdir()
    (d / "evil_nobody").mkdir()
    _copy(built.patches["fix_parse"], d / "good" / "rel_race.so")
    _copy(built.patches["rel_evil_patch"], d / "evil_ww" / "rel_race.so", 0o646)
    os.chown(_copy(built.patches["rel_evil_patch"], d / "evil_nobody" / "rel_race.so"),
             NOBODY, NOBODY)
    links = []
    for name in ("good", "evil_ww", "evil_nobody"):
        link = d / f"to_{name}"
        link.symlink_to(d / name)
        links.append(link)
    current = d / "current"
    current.symlink_to(d / "good")
    srv = start_server(built.binary, mode, {"REL_EVIL_MARKER": str(marker)})
    started.append(srv)
    outcome = _apply_while_swapping(
        srv, current / "rel_race.so", marker,
        Swapper(current, [links[0], links[1], links[0], links[2]]),
        ("writable by group or others", f"owned by uid {NOBODY}"))
    figures(f"folder swap race ({mode})", **outcome)
    assert outcome["loaded_good"] > 0
    assert not marker.exists()
    assert_stops_cleanly(srv)


# ---- a setuid program ------------------------------------------------------------------------

@needs_nobody
def test_a_setuid_program_ignores_the_environment_of_the_user_who_runs_it(
        gdb_build: tuple[Path, Path], public_dir: Path) -> None:
    prog, _ = gdb_build
    setuid = public_dir / "rel_gdb"
    shutil.copyfile(prog, setuid)
    os.chown(setuid, 0, 0)
    setuid.chmod(0o4755)
    marker = public_dir / "constructor_ran"
    # root's, 0755, with a fentry_patch symbol: loaded (its constructor runs) if the
    # environment is honoured
    lib = _plain_shared_object(public_dir, marker, claims_to_be_a_patch=True)
    lib.chmod(0o755)
    made = public_dir / "made_by_root"
    # ... and the same object in every patch directory the user's environment could name.
    build_id = read_binary(prog).build_id_hex
    assert build_id
    for root in (public_dir / "pdir", public_dir / "xdg" / "fentry",
                 public_dir / "home" / ".local" / "share" / "fentry"):
        (root / build_id).mkdir(parents=True)
        shutil.copyfile(lib, root / build_id / "plain.so")
        (root / build_id / "plain.so").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "FENTRY_PATCHES": str(lib), "FENTRY_RUNTIME_DIR": str(made),
           "FENTRY_PATCH_DIR": str(public_dir / "pdir"), "XDG_DATA_HOME": str(public_dir / "xdg"),
           "HOME": str(public_dir / "home")}
    result = subprocess.run([*as_nobody(), str(setuid), "c", "/nonexistent.so"], env=env,
                            capture_output=True, text=True, timeout=30, cwd="/")
    assert "result 4" in result.stdout, result
    euid = marker.read_text().strip() if marker.exists() else None
    if euid is not None and "euid=0" not in euid:
        pytest.skip(f"{public_dir} does not honour setuid (nosuid?): {euid}")
    assert euid is None, ("the user's FENTRY_PATCHES or patch directory made the setuid "
                          f"program run: {euid}")
    assert not made.exists(), "the user's FENTRY_RUNTIME_DIR made the setuid program mkdir"
