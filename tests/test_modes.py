"""The three ways __fentry__ comes into a process: linked, preloaded, attached.

Real programs, real processes, the real CLI.  The program is tests/programs/modes_server.c
(a TCP server whose BUSY threads call the patched function and malloc() in a tight loop),
built with the instrumentation flags and *without* the shim; the shared shim comes from
`fentry-build shim-path` (a private cache per test session) and is brought in with
LD_PRELOAD or `fentry-build attach`.  See docs/modes.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fentry_build
from fentry_build import paths
from fentry_build.binary import dynamic
from fentry_build.build import sharedshim
from fentry_build.client import attach, attach_checks, attach_gdb, attach_plan, mapped, procfs
from fentry_build.errors import FentryError

from support.builds import PROGRAMS, build_patch, build_program, meson, run
from support.cli import CLI_TIMEOUT, NOBODY, cli
from support.procs import spawn
from support.servers import BUSY, ModesServer, _read_line, proc_status

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
needs_gdb = pytest.mark.needs_gdb
needs_nobody = pytest.mark.needs_nobody

ATTACH_LIMIT = CLI_TIMEOUT  # a bound on one attach on a loaded 2-CPU machine


# ---- building -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private XDG_CACHE_HOME for this module, also used by every CLI run."""
    home = tmp_path_factory.mktemp("cache")
    home.chmod(0o755)  # `nobody` runs the CLI in one test
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def shim_so(cache_home: Path) -> Path:
    proc = cli("shim-path")
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """modes_server without the shim (and its patch), the same linked, and the helpers."""
    d = tmp_path_factory.mktemp("modes")
    unlinked = ["-mno-record-mcount"]  # what instrument_dep gives: no -mrecord-mcount
    server = build_program([PROGRAMS / "modes_server.c"], d / "modes_server", with_shim=False,
                           cflags=unlinked)
    (d / "linked").mkdir()
    linked = build_program([PROGRAMS / "modes_server.c"], d / "linked" / "modes_server")
    waiter = build_program([PROGRAMS / "modes_waiter.c"], d / "modes_waiter", with_shim=False,
                           cflags=unlinked)
    tracer = d / "modes_tracer"
    run(["gcc", "-O2", "-o", str(tracer), str(PROGRAMS / "modes_tracer.c")])
    return {
        "server": server,
        "patch": build_patch(server, PROGRAMS / "modes_patch.c", d / "modes_patch.so"),
        "linked": linked,
        "linked_patch": build_patch(linked, PROGRAMS / "modes_patch.c", d / "linked" / "modes_patch.so"),
        "waiter": waiter,
        "tracer": tracer,
    }


# ---- running --------------------------------------------------------------------------


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A short runtime folder for the control sockets (socket paths must stay short)."""
    d = Path(tempfile.mkdtemp(prefix="fm-", dir="/tmp"))
    d.chmod(0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers(rundir: Path) -> Iterator[list[ModesServer]]:
    started: list[ModesServer] = []
    yield started
    for s in started:
        s.stop()


def start(servers: list[ModesServer], binary: Path, rundir: Path, **kw: Any) -> ModesServer:
    s = ModesServer(binary, rundir, **kw)
    servers.append(s)
    return s


def thread_masks(pid: int) -> dict[str, tuple[str, str]]:
    """Per thread: its blocked and pending signal sets."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = {k: v.strip() for k, _, v in
                  (ln.partition(":") for ln in (task / "status").read_text().splitlines())}
        except FileNotFoundError:
            continue
        out[task.name] = (st["SigBlk"], st["ShdPnd"])
    return out


def has_shim_mapped(pid: int) -> bool:
    return sharedshim.LIBRARY_NAME in Path(f"/proc/{pid}/maps").read_text()


def assert_untouched(server: ModesServer) -> None:
    """Alive, running, not traced, no shim mapped, still answering with the original code."""
    assert server.alive()
    st = proc_status(server.pid)
    assert st["TracerPid"] == "0"
    assert st["State"][0] in "SR", st["State"]
    assert not has_shim_mapped(server.pid)
    assert server.compute(7) == 14


class Load:
    """Client threads sending `c X` requests non-stop; any failure or wrong answer counts."""

    def __init__(self, server: ModesServer, clients: int = 4, factors: tuple[int, ...] = (2, 3)) -> None:
        self.server = server
        self.factors = factors
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self, n: int) -> None:
        try:
            s, f = self.server.connect()
        except OSError as e:
            with self.lock:
                self.failures.append(f"connect: {e}")
            return
        x = n * 1000
        with s, f:
            while not self.stop.is_set():
                x += 1
                try:
                    f.write(f"c {x}\n")
                    f.flush()
                    answer = int(f.readline())
                except (OSError, ValueError) as e:
                    with self.lock:
                        self.failures.append(f"request c {x}: {e!r}")
                    return
                with self.lock:
                    if answer in [k * x for k in self.factors]:
                        self.ok += 1
                    else:
                        self.failures.append(f"c {x} -> {answer}")

    def count(self) -> int:
        with self.lock:
            return self.ok


# ---- fentry-build shim-path ------------------------------------------------------------


def test_shim_path_builds_once_into_a_private_cache(shim_so: Path, cache_home: Path) -> None:
    assert shim_so.name == "libfentry.so"
    version_dir = shim_so.parent
    assert version_dir.parent == cache_home / "fentry_build"
    assert version_dir.name.startswith(fentry_build.__version__ + "-")
    expected = 0o755 if os.geteuid() == 0 else 0o700
    for d in (version_dir, version_dir.parent):
        st = d.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == expected
    st = shim_so.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
    assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    again = cli("shim-path")
    assert again.returncode == 0 and again.stdout.strip() == str(shim_so)
    assert shim_so.stat().st_mtime_ns == st.st_mtime_ns  # cached, not rebuilt
    assert not list(version_dir.glob(".build-*"))        # no temporary left behind


def test_shared_shim_exports_fentry_and_calls_no_profiler(shim_so: Path) -> None:
    dyn = run(["nm", "-D", str(shim_so)]).stdout
    defined = {ln.split()[-1] for ln in dyn.splitlines() if len(ln.split()) == 3 and ln.split()[1] == "T"}
    undefined = {ln.split()[-1].split("@")[0] for ln in dyn.splitlines() if ln.split()[0] == "U"}
    assert "__fentry__" in defined and "fentry_current_mode" in defined
    assert not undefined & {"__fentry__", "mcount", "_mcount", "__cyg_profile_func_enter"}
    assert "TEXTREL" not in run(["readelf", "-d", str(shim_so)]).stdout


def test_shim_path_refuses_a_cache_folder_others_can_write(shim_so: Path) -> None:
    folder = shim_so.parent.parent
    folder.chmod(0o777)
    try:
        proc = cli("shim-path")
    finally:
        folder.chmod(0o755 if os.geteuid() == 0 else 0o700)
    assert proc.returncode == 1
    assert proc.stderr.startswith("fentry-build: error: cache folder ")
    assert "writable by group or others" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_shim_path_refuses_a_cached_file_others_can_write(shim_so: Path) -> None:
    shim_so.chmod(0o666)
    try:
        proc = cli("shim-path")
    finally:
        shim_so.chmod(0o644)
    assert proc.returncode == 1 and "cached shim" in proc.stderr, proc.stderr


def test_a_changed_shim_source_gets_its_own_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        cache_home: Path) -> None:
    before = sharedshim.library_path()
    copy = tmp_path / "shim"
    shutil.copytree(paths.shim_dir(), copy)
    (copy / "core" / "init.c").write_text((copy / "core" / "init.c").read_text() + "\n/* changed */\n")
    monkeypatch.setattr(paths, "shim_dir", lambda: copy)
    after = sharedshim.library_path()
    assert after.parent.parent == before.parent.parent and after != before


def test_unlinked_program_binds_to_glibc_and_has_no_text_relocations(built: dict[str, Path]) -> None:
    relocs = run(["readelf", "-rW", str(built["server"])]).stdout
    assert any("__fentry__" in ln and ("GLOB_DAT" in ln or "JUMP_SLO" in ln) for ln in relocs.splitlines())
    assert "TEXTREL" not in run(["readelf", "-d", str(built["server"])]).stdout
    listing = run(["objdump", "-d", "--no-show-raw-insn", str(built["server"])]).stdout
    assert "call   *" in listing and "__fentry__" in listing  # ff 15: call through the GOT


# ---- preload ------------------------------------------------------------------------------


def test_preload_with_fentry_patches(built: dict[str, Path], shim_so: Path, rundir: Path,
                                     servers: list[ModesServer]) -> None:
    plain = start(servers, built["server"], rundir, busy=2)
    assert plain.compute(5) == 10
    patched = start(servers, built["server"], rundir, busy=2, env={
        "LD_PRELOAD": str(shim_so), "FENTRY_PATCHES": str(built["patch"]), "FENTRY_CONTROL": "0"})
    assert patched.compute(5) == 15
    patched.wait_busy_results(3)
    plain.wait_busy_results(2)
    assert not (rundir / f"{patched.pid}.sock").exists()  # FENTRY_CONTROL=0 honoured


def test_preload_apply_list_revert_with_the_cli(built: dict[str, Path], shim_so: Path, rundir: Path,
                                                servers: list[ModesServer]) -> None:
    s = start(servers, built["server"], rundir, env={"LD_PRELOAD": str(shim_so)})
    status = json.loads(cli("status", "--pid", str(s.pid), "--json").stdout)
    assert status["mode"] == "dispatch" and status["patches_active"] == 0
    with Load(s) as load:
        applied = cli("apply", "--pid", str(s.pid), str(built["patch"]))
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.strip() == "applied modes_patch (1 function replaced)"
        assert s.compute(5) == 15
        s.wait_busy_results(3)
        listing = json.loads(cli("list", "--pid", str(s.pid), "--json").stdout)
        [patch] = listing["patches"]
        assert patch["name"] == "modes_patch" and patch["state"] == "active"
        assert patch["functions"][0]["name"] == "compute" and patch["functions"][0]["in_effect"]
        reverted = cli("revert", "--pid", str(s.pid), "modes_patch")
        assert reverted.returncode == 0, reverted.stderr
        assert s.compute(5) == 10
        s.wait_busy_results(2)
        time.sleep(0.3)
    assert load.failures == [] and load.count() > 0
    # attach sees the preloaded shim and does nothing.
    again = cli("attach", "--pid", str(s.pid))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"process {s.pid} already has the fentry shim (loaded from ")
    assert s.alive()


# ---- attach -------------------------------------------------------------------------------


@needs_gdb
@pytest.mark.stress
def test_attach_under_client_load_then_apply_and_revert(built: dict[str, Path], shim_so: Path,
                                                         rundir: Path, servers: list[ModesServer]) -> None:
    s = start(servers, built["server"], rundir)
    s.wait_busy_results(2)
    with Load(s) as load:
        time.sleep(0.2)
        masks = thread_masks(s.pid)
        before = load.count()
        started = time.monotonic()
        proc = cli("attach", "--pid", str(s.pid), "--json")
        took = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["attached"] is True and report["slots"] == 1
        assert report["library"] == str(shim_so) and report["mode"] == "dispatch"
        assert took < ATTACH_LIMIT
        # Signal masks and pending signals of the threads that were there are as before.
        after = thread_masks(s.pid)
        kept = masks.keys() & after.keys()  # threads of finished connections come and go
        assert len(kept) >= 1 + BUSY + 4
        assert {tid: after[tid] for tid in kept} == {tid: masks[tid] for tid in kept}
        assert proc_status(s.pid)["TracerPid"] == "0"
        time.sleep(0.2)
        assert load.count() > before  # requests kept being served around the attach
        applied = cli("apply", "--pid", str(s.pid), str(built["patch"]))
        assert applied.returncode == 0, applied.stderr
        assert s.compute(5) == 15
        s.wait_busy_results(3)
        assert cli("revert", "--pid", str(s.pid), "modes_patch").returncode == 0
        s.wait_busy_results(2)
        time.sleep(0.2)
    assert load.failures == [], load.failures[:5]
    assert load.count() > before
    again = cli("attach", "--pid", str(s.pid))
    assert again.returncode == 0
    assert again.stdout.strip() == (f"process {s.pid} already has the fentry shim (loaded from "
                                    f"{shim_so}); nothing to do - use fentry-build apply")
    assert s.alive()


@needs_gdb
@pytest.mark.stress
def test_attach_while_signals_keep_arriving(built: dict[str, Path], shim_so: Path, rundir: Path,
                                            servers: list[ModesServer]) -> None:
    s = start(servers, built["server"], rundir)
    stop = threading.Event()
    sent = [0]

    def signal_often() -> None:
        while not stop.is_set():
            os.kill(s.pid, signal.SIGUSR1)
            sent[0] += 1
            time.sleep(0.002)

    pelter = threading.Thread(target=signal_often, daemon=True)
    with Load(s, clients=2) as load:
        pelter.start()
        try:
            proc = cli("attach", "--pid", str(s.pid))
            assert proc.returncode == 0, proc.stderr
        finally:
            stop.set()
            pelter.join(timeout=10)
        assert cli("apply", "--pid", str(s.pid), str(built["patch"])).returncode == 0
        s.wait_busy_results(3)
    assert load.failures == [] and load.count() > 0
    handled = int(s.ask("u"))
    assert 0 < handled <= sent[0]  # delivered (standard signals may merge while pending)
    assert s.alive()


@needs_gdb
@pytest.mark.stress
def test_attach_twenty_processes_with_eight_busy_threads(built: dict[str, Path], shim_so: Path,
                                                         rundir: Path, servers: list[ModesServer]) -> None:
    hosts = []
    for round_ in range(20):
        s = start(servers, built["server"], rundir)
        s.wait_busy_results(2)
        proc = cli("attach", "--pid", str(s.pid), "--json")
        assert proc.returncode == 0, f"round {round_}: {proc.stderr}"
        hosts.append(json.loads(proc.stdout)["host_thread"])
        applied = cli("apply", "--pid", str(s.pid), str(built["patch"]))
        assert applied.returncode == 0, f"round {round_}: {applied.stderr}"
        assert s.compute(11) == 33
        s.wait_busy_results(3)
        s.wait_all_threads_advance()  # every busy thread is alive and makes progress
        assert s.alive()
        s.stop()
        servers.remove(s)
    assert len(hosts) == 20


@needs_gdb
@pytest.mark.slow
def test_attach_to_a_process_that_maps_a_file_whose_path_is_not_utf8(
        built: dict[str, Path], shim_so: Path, rundir: Path, servers: list[ModesServer],
        tmp_path: Path) -> None:
    """/proc/PID/maps shows a path's bytes; one that is not UTF-8 (here a library preloaded
    from such a folder) is read by attach and by the gdb side like any other."""
    folder = os.fsencode(tmp_path) + b"/lib\xff\xfe"
    os.mkdir(folder)
    lib = folder + b"/libm.so.6"
    libm = next(p for p in (Path("/usr/lib/x86_64-linux-gnu/libm.so.6"),
                            Path("/lib/x86_64-linux-gnu/libm.so.6")) if p.exists())
    with open(libm, "rb") as src, open(lib, "wb") as dst:
        dst.write(src.read())
    s = start(servers, built["server"], rundir, env={"LD_PRELOAD": os.fsdecode(lib)})
    s.wait_busy_results(2)
    assert b"/lib\xff\xfe/libm.so.6" in Path(f"/proc/{s.pid}/maps").read_bytes()
    proc = cli("attach", "--pid", str(s.pid), "--json")
    assert proc.returncode == 0, proc.stderr
    applied = cli("apply", "--pid", str(s.pid), str(built["patch"]))
    assert applied.returncode == 0, applied.stderr
    assert s.compute(11) == 33 and s.alive()


@needs_gdb
@pytest.mark.slow
def test_attach_to_a_program_linked_with_the_shim_does_nothing(built: dict[str, Path], rundir: Path,
                                                               servers: list[ModesServer]) -> None:
    s = start(servers, built["linked"], rundir, busy=2)
    proc = cli("attach", "--pid", str(s.pid))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"process {s.pid} already has the fentry shim (linked into the "
                                   "program); nothing to do - use fentry-build apply")
    quiet = start(servers, built["linked"], rundir, busy=2, env={"FENTRY_CONTROL": "0"})
    proc = cli("attach", "--pid", str(quiet.pid))
    assert proc.returncode == 0 and "linked into the program" in proc.stdout
    assert proc_status(s.pid)["TracerPid"] == "0" and s.compute(2) == 4


def test_attach_refuses_a_program_that_is_not_instrumented(cache_home: Path) -> None:
    sleeper = spawn(["sleep", "300"])
    try:
        proc = cli("attach", "--pid", str(sleeper.pid))
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"fentry-build: error: process {sleeper.pid} (")
        assert "is not instrumented" in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert sleeper.poll() is None and proc_status(sleeper.pid)["TracerPid"] == "0"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_attach_refuses_a_missing_process() -> None:
    proc = cli("attach", "--pid", "999999999")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "fentry-build: error: no process with pid 999999999"


@needs_nobody
@pytest.mark.slow
def test_attach_refuses_a_process_of_another_user(built: dict[str, Path], rundir: Path,
                                                 servers: list[ModesServer], cache_home: Path) -> None:
    s = start(servers, built["server"], rundir, busy=2)  # runs as root
    proc = cli("attach", "--pid", str(s.pid), as_nobody=True)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == (f"fentry-build: error: process {s.pid} runs as uid 0 (root); only "
                                   "that user or root may attach to it (ptrace permission)")
    assert_untouched(s)


@needs_nobody
@needs_gdb
@pytest.mark.slow
def test_attach_as_an_ordinary_user(built: dict[str, Path], servers: list[ModesServer]) -> None:
    """nobody attaches to nobody's process: the cache is nobody's own (0700), gdb may ptrace."""
    top = Path(tempfile.mkdtemp(prefix="fm-", dir="/tmp"))
    try:
        top.chmod(0o755)
        for name in ("server", "patch"):
            shutil.copy(built[name], top)
        cache, rundir = top / "cache", top / "run"
        for d in (cache, rundir):
            d.mkdir(mode=0o700)
            os.chown(d, NOBODY, NOBODY)
        s = start(servers, top / "modes_server", rundir, busy=4, as_nobody=True)
        assert proc_status(s.pid)["Uid"].split()[1] == str(NOBODY)
        env = {"XDG_CACHE_HOME": str(cache)}
        attached = cli("attach", "--pid", str(s.pid), "--json", as_nobody=True, env_extra=env)
        assert attached.returncode == 0, attached.stderr
        lib = Path(json.loads(attached.stdout)["library"])
        assert lib.is_relative_to(cache / "fentry_build")
        for p in (lib, lib.parent, lib.parent.parent):
            assert p.stat().st_uid == NOBODY
        assert stat.S_IMODE(lib.parent.stat().st_mode) == 0o700
        applied = cli("apply", "--pid", str(s.pid), str(top / "modes_patch.so"), as_nobody=True,
                      env_extra=env)
        assert applied.returncode == 0, applied.stderr
        assert s.compute(6) == 18
        s.wait_busy_results(3)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@needs_gdb
@pytest.mark.slow
def test_attach_refuses_a_process_already_traced(built: dict[str, Path], rundir: Path,
                                                 servers: list[ModesServer]) -> None:
    s = start(servers, built["server"], rundir, busy=2)
    tracer = subprocess.Popen([str(built["tracer"]), str(s.pid)], stdout=subprocess.PIPE, bufsize=0)
    try:
        assert _read_line(tracer, time.monotonic() + 10) == "traced"
        proc = cli("attach", "--pid", str(s.pid))
        assert proc.returncode == 1
        assert proc.stderr.strip() == (f"fentry-build: error: process {s.pid} is already traced by "
                                       f"pid {tracer.pid} (modes_tracer); detach that debugger or "
                                       "tracer first")
        assert not has_shim_mapped(s.pid) and s.compute(3) == 6
    finally:
        tracer.kill()
        tracer.wait()
        assert tracer.stdout is not None
        tracer.stdout.close()
    time.sleep(0.1)
    assert_untouched(s)


@needs_gdb
@pytest.mark.slow
def test_attach_refuses_a_stopped_process(built: dict[str, Path], rundir: Path,
                                          servers: list[ModesServer]) -> None:
    s = start(servers, built["server"], rundir, busy=1)
    os.kill(s.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while proc_status(s.pid)["State"][0] != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        proc = cli("attach", "--pid", str(s.pid))
        assert proc.returncode == 1 and f"process {s.pid} is stopped" in proc.stderr
    finally:
        os.kill(s.pid, signal.SIGCONT)
    time.sleep(0.1)
    assert_untouched(s)


@needs_gdb
@pytest.mark.slow
def test_attach_gives_up_in_bounded_time_when_no_thread_is_at_a_safe_point(
        built: dict[str, Path], rundir: Path, cache_home: Path, shim_so: Path) -> None:
    waiter = subprocess.Popen([str(built["waiter"])], stdout=subprocess.PIPE, bufsize=0,
                              env={**os.environ, "FENTRY_RUNTIME_DIR": str(rundir)})
    try:
        _read_line(waiter, time.monotonic() + 10)
        started = time.monotonic()
        proc = cli("attach", "--pid", str(waiter.pid), "--tries", "5")
        took = time.monotonic() - started
        assert proc.returncode == 1
        assert "no thread reached a safe point in 5 tries" in proc.stderr, proc.stderr
        assert "the process was not changed" in proc.stderr
        assert took < ATTACH_LIMIT
        assert waiter.poll() is None
        st = proc_status(waiter.pid)
        assert st["TracerPid"] == "0" and st["State"][0] == "S"
        assert not has_shim_mapped(waiter.pid)
    finally:
        waiter.kill()
        waiter.wait()
        assert waiter.stdout is not None
        waiter.stdout.close()


# ---- the pieces, without processes ----------------------------------------------------------


def _status(**kw: Any) -> procfs.ProcStatus:
    base = dict(name="x", state="S", ppid=1, tracer=0, uids=(0, 0, 0, 0), gids=(0, 0, 0, 0), seccomp=0)
    base.update(kw)
    return procfs.ProcStatus(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("state, words", [("Z", "has exited"), ("T", "is stopped"), ("t", "is stopped")])
def test_check_permission_refuses_dead_and_stopped(state: str, words: str) -> None:
    with pytest.raises(FentryError, match=words):
        attach_checks.check_permission(os.getpid(), _status(state=state))


@pytest.mark.parametrize("kw, words", [
    ({"tracer": 1}, "already traced by pid 1"),
    ({"seccomp": 2}, "seccomp filter"),
    ({"seccomp": 1}, "seccomp strict mode"),
])
def test_check_attachable_refusals(kw: dict[str, Any], words: str) -> None:
    with pytest.raises(FentryError, match=words):
        attach_checks.check_attachable(os.getpid(), _status(**kw))


def test_check_attachable_reads_yama(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attach_checks, "yama_scope", lambda: 3)
    with pytest.raises(FentryError, match="ptrace_scope=3"):
        attach_checks.check_attachable(os.getpid(), _status())
    monkeypatch.setattr(attach_checks, "yama_scope", lambda: 2)
    monkeypatch.setattr(procfs, "has_capability", lambda cap: False)
    with pytest.raises(FentryError, match="ptrace_scope=2"):
        attach_checks.check_attachable(os.getpid(), _status())


def test_a_ptrace_refusal_from_gdb_is_one_line_that_names_the_causes() -> None:
    err = attach._explain(42, {"stage": "attach", "error": "ptrace: Operation not permitted."})
    assert str(err) == ("cannot attach to process 42: ptrace is not permitted: another user's "
                        "process, Yama (kernel.yama.ptrace_scope), a seccomp filter or a container "
                        "without CAP_SYS_PTRACE; the process was not touched")


RANGES = {
    "runtime": [[0x1000, 0x9000, "libc.so.6"], [0xA000, 0xB000, "ld-linux-x86-64.so.2"]],
    "leaf": [[0x2000, 0x2100, "accept"], [0x2200, 0x2300, "__fentry__"]],
    "ldso": [[0xA000, 0xB000, "ld-linux-x86-64.so.2"]],
    "entry": [[0x50000, 0x50030, "_start"]],
}
USER_PC, USER_PC2 = 0x40000, 0x40100
START_THREAD, LIBC_START = 0x3001, 0x3101  # libc code that is no leaf


@pytest.mark.parametrize("pcs, rank", [
    ([USER_PC, USER_PC2, START_THREAD], 0),                       # busy in its own code
    ([0x2050, USER_PC, START_THREAD], 1),                         # blocked in accept()
    ([0x2250, USER_PC, USER_PC2, START_THREAD], 1),               # in glibc's __fentry__
    ([USER_PC, LIBC_START, LIBC_START, 0x50010], 0),              # main thread, down to _start
    ([USER_PC], 0),                                               # no C library below
])
def test_host_verdict_accepts(pcs: list[int], rank: int) -> None:
    c = attach_gdb.Classifier(RANGES)
    assert attach_gdb.host_verdict(pcs, False, True, c) == (rank, "safe")


@pytest.mark.parametrize("pcs, sigtramp, complete, words", [
    ([0x1500, USER_PC, START_THREAD], False, True, "inside libc.so.6"),         # malloc & co
    ([0x2050, 0x1500, USER_PC], False, True, "inside libc.so.6"),              # leaf called by libc
    ([0xA100, USER_PC, START_THREAD], False, True, "inside ld-linux"),         # the dynamic linker
    ([USER_PC, 0x1500, USER_PC2, START_THREAD], False, True, "called the program's code"),  # callback
    ([USER_PC, USER_PC2], True, True, "signal handler"),
    ([USER_PC, USER_PC2], False, False, "could not be read"),
    ([], False, True, "no frames"),
])
def test_host_verdict_refuses(pcs: list[int], sigtramp: bool, complete: bool, words: str) -> None:
    c = attach_gdb.Classifier(RANGES)
    rank, why = attach_gdb.host_verdict(pcs, sigtramp, complete, c)
    assert rank is None and words in why


def test_threads_in_the_dynamic_linker_are_found() -> None:
    c = attach_gdb.Classifier(RANGES)
    assert attach_gdb.threads_in_ldso({1: [USER_PC, START_THREAD], 2: [0x4000, 0xA010 + 1, USER_PC]}, c) == [2]


def test_the_plan_names_glibc_functions_and_the_slot(built: dict[str, Path], rundir: Path,
                                                     servers: list[ModesServer], shim_so: Path) -> None:
    s = start(servers, built["server"], rundir, busy=1)
    maps = procfs.read_maps(s.pid)
    objects = mapped.loaded_objects(s.pid, maps, attach_plan.SYMBOLS)
    plan = attach_plan.build_plan(s.pid, maps, objects, shim_so)
    assert plan.version == attach_plan.PLAN_VERSION == attach_gdb.PLAN_VERSION
    assert set(plan.functions) == set(attach_plan.TARGET_FUNCTIONS)
    [slot] = plan.slots
    assert slot["module"] == str(built["server"])
    # The slot holds glibc's __fentry__ now: read it the way gdb will check it.
    value = procfs.read_mem_u64(s.pid, slot["addr"])
    assert value is not None and any(lo <= value < hi for lo, hi in slot["accept"])
    # RELRO made it read-only after relocation: gdb's ptrace write must (and does) bypass that.
    [where] = [m for m in maps if m.start <= slot["addr"] < m.end]
    assert where.perms.startswith("r--"), where
    labels = {label for _, _, label in plan.ranges["leaf"]}
    assert {"accept", "__fentry__"} <= labels
    assert attach_checks.shim_presence(s.pid, objects) is None


def _full_scan(elf: Any, names: frozenset[str]) -> dict[str, list[tuple[int, int, bool]]]:
    """Every definition of `names` in .dynsym, read symbol by symbol (the reference)."""
    from elftools.elf.sections import SymbolTableSection

    dynsym, versym = elf.get_section_by_name(".dynsym"), elf.get_section_by_name(".gnu.version")
    assert isinstance(dynsym, SymbolTableSection)
    found: dict[str, list[tuple[int, int, bool]]] = {}
    for index, sym in enumerate(dynsym.iter_symbols()):
        if (index and sym.name in names and sym["st_shndx"] != "SHN_UNDEF"
                and sym["st_info"]["type"] in dynamic.DEFINED_KINDS):
            ndx = versym.get_symbol(index)["ndx"] if versym is not None else 0
            hidden = isinstance(ndx, int) and bool(ndx & dynamic.VERSYM_HIDDEN)
            found.setdefault(sym.name, []).append((sym["st_value"], sym["st_size"], not hidden))
    return found


@pytest.mark.parametrize("hash_style", ["libc", "gnu", "sysv"])
def test_attach_finds_every_version_of_a_symbol_as_a_full_scan_does(hash_style: str,
                                                                     tmp_path: Path) -> None:
    """The symbols attach needs are looked up through .gnu.hash (a C library has 3,000); the
    result must be a full scan's, every version of each name included, and a file without
    .gnu.hash is scanned whole."""
    from elftools.elf.elffile import ELFFile

    if hash_style == "libc":
        [lib] = {m.path for m in procfs.read_maps(os.getpid()) if Path(m.path).name.startswith("libc.so")}
        names = attach_plan.SYMBOLS | mapped.CLASSIFYING_SYMBOLS
    else:  # two versions of one name (the older hidden), and names in many buckets
        src, vers = tmp_path / "v.c", tmp_path / "v.map"
        src.write_text("".join(f"int f{i}(void) {{ return {i}; }}\n" for i in range(200))
                       + "int old_g(void) { return 1; }\nint new_g(void) { return 2; }\n"
                       + '__asm__(".symver old_g, g@V1");\n__asm__(".symver new_g, g@@V2");\n')
        vers.write_text("V1 { global: f*; g; local: *; };\nV2 { global: g; } V1;\n")
        lib = str(tmp_path / "libv.so")
        run(["gcc", "-shared", "-fPIC", "-o", lib, str(src), f"-Wl,--version-script={vers}",
             f"-Wl,--hash-style={hash_style}"])
        names = frozenset({"g", "f0", "f77", "f199", "missing"})
    with open(lib, "rb") as f:
        elf = ELFFile(f)
        assert (elf.get_section_by_name(".gnu.hash") is None) == (hash_style == "sysv")
        found = dynamic.dynamic_symbols(elf, names)
        assert found == _full_scan(elf, names)
    if hash_style == "libc":
        assert len(found["dlopen"]) >= 1 and [e[2] for e in found["dlopen"]].count(True) == 1
    else:
        assert sorted(e[2] for e in found["g"]) == [False, True] and "missing" not in found


def test_a_loaded_object_refuses_a_name_it_did_not_read(built: dict[str, Path], rundir: Path,
                                                        servers: list[ModesServer]) -> None:
    s = start(servers, built["server"], rundir, busy=1)
    objects = mapped.loaded_objects(s.pid, procfs.read_maps(s.pid))
    [libc] = [o for o in objects if o.is_libc]
    with pytest.raises(KeyError, match="dlopen was not looked up"):
        libc.address("dlopen")


# ---- Meson: instrument_dep and the shared shim -------------------------------------------

MESON_PRELOAD_PROJECT = """
project('preloaded', 'c', meson_version: '>=1.1')
fentry_sub = subproject('fentry')
instrument_dep = fentry_sub.get_variable('instrument_dep')   # flags only, no shim
libfentry = fentry_sub.get_variable('fentry_shared')          # the shim as libfentry.so
server = executable('modes_server', 'modes_server.c',
  dependencies: [instrument_dep, dependency('threads')])
alias_target('shim', libfentry)
"""


@pytest.mark.slow
def test_meson_instrument_dep_and_shared_shim(tmp_path: Path, rundir: Path, servers: list[ModesServer]) -> None:
    from fentry_build.build import meson_init

    project = tmp_path / "preloaded"
    project.mkdir()
    (project / "meson.build").write_text(MESON_PRELOAD_PROJECT)
    shutil.copy(PROGRAMS / "modes_server.c", project)
    meson_init.meson_init(project)
    meson("setup", "build", cwd=project)
    meson("compile", "-C", "build", cwd=project)
    build = project / "build"
    assert not (build / "subprojects" / "fentry" / "shim" / "libfentry.so").exists()  # not by default
    meson("compile", "-C", "build", "shim", cwd=project)
    lib = build / "subprojects" / "fentry" / "shim" / "libfentry.so"
    assert lib.is_file()

    commands = json.loads((build / "compile_commands.json").read_text())
    [server_c] = [c for c in commands if c["file"].endswith("modes_server.c")]
    args = shlex.split(server_c["command"])
    assert {"-pg", "-mfentry", "-flive-patching=inline-clone"} <= set(args)
    assert "-mrecord-mcount" not in args
    program = build / "modes_server"
    relocs = run(["readelf", "-rW", str(program)]).stdout
    assert any("__fentry__" in ln and "GLOB_DAT" in ln for ln in relocs.splitlines())
    assert "fentry_current_mode" not in run(["nm", str(program)]).stdout  # no shim linked

    patch = build_patch(program, PROGRAMS / "modes_patch.c", tmp_path / "modes_patch.so")
    s = start(servers, program, rundir, busy=2, env={"LD_PRELOAD": str(lib)})
    assert s.compute(4) == 8
    applied = cli("apply", "--pid", str(s.pid), str(patch))
    assert applied.returncode == 0, applied.stderr
    assert s.compute(4) == 12
    s.wait_busy_results(3)


# ---- examples/server, attached while clients use it ---------------------------------------

EXAMPLE_SERVER = paths.examples_dir() / "server"


@needs_gdb
@pytest.mark.skipif(not (EXAMPLE_SERVER / "server.c").is_file(), reason="examples/server not there")
@pytest.mark.stress
def test_attach_to_the_example_server_under_load(tmp_path: Path, rundir: Path, cache_home: Path,
                                                 shim_so: Path) -> None:
    sources = [EXAMPLE_SERVER / "server.c", EXAMPLE_SERVER / "parser.c"]
    program = build_program(sources, tmp_path / "server", with_shim=False,
                            cflags=["-mno-record-mcount", f"-I{EXAMPLE_SERVER}"])
    fix = build_patch(program, EXAMPLE_SERVER / "patches" / "fix_parse.c", tmp_path / "fix_parse.so",
                      cflags=[f"-I{EXAMPLE_SERVER}"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_") and k != "LD_PRELOAD"}
    env["FENTRY_RUNTIME_DIR"] = str(rundir)
    proc = subprocess.Popen([str(program), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0, env=env)
    try:
        line = _read_line(proc, time.monotonic() + 30)
        port = int(line.rsplit(":", 1)[1])

        def ask(request: str) -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s, s.makefile("rw") as f:
                f.write(request + "\n")
                f.flush()
                return str(f.readline().strip())

        eight = "SUM 1 2 3 4 5 6 7 8"
        assert ask(eight).startswith("ERR too many numbers")
        failures: list[str] = []
        served = [0]
        stop = threading.Event()

        def client() -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=20) as s, s.makefile("rw") as f:
                    while not stop.is_set():
                        f.write("SUM 1 2 3\n")
                        f.flush()
                        answer = f.readline().strip()
                        if answer != "OK 6":
                            failures.append(answer)
                        served[0] += 1
            except OSError as e:
                failures.append(repr(e))

        clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in clients:
            t.start()
        time.sleep(0.3)
        attached = cli("attach", "--pid", str(proc.pid))
        assert attached.returncode == 0, attached.stderr
        assert attached.stdout.startswith(f"attached the fentry shim to process {proc.pid}")
        applied = cli("apply", "--pid", str(proc.pid), str(fix))
        assert applied.returncode == 0, applied.stderr
        assert ask(eight) == "OK 36"
        before = served[0]
        time.sleep(0.3)
        stop.set()
        for t in clients:
            t.join(timeout=30)
        assert failures == [] and served[0] > before > 0
        # Its signal handling is intact: SIGTERM still reaches sigwait() and it exits cleanly.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.decode().strip() == "stopped (SIGTERM)"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
