"""Safe unload: a reverted patch's .so is unloaded only when no thread can be in its code."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from fentry_build.client import control
from fentry_build.errors import FentryError

from support.builds import PROGRAMS, build_patch, build_program


def maps_of(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
def test_unload_waits_for_a_thread_parked_inside_the_replacement(tmp_path: Path,
                                                                 mode: str) -> None:
    prog = build_program([PROGRAMS / "parked.c"], tmp_path / "parked")
    patch = build_patch(prog, PROGRAMS / "parked_patch.c", tmp_path / "parked_patch.so")
    release = tmp_path / "release"
    runtime = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_RUNTIME_DIR": str(runtime),
                "PARK_RELEASE": str(release)})
    proc = subprocess.Popen([str(prog)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        assert proc.stdout.readline() == "park returned 1\n"
        os.environ["FENTRY_RUNTIME_DIR"] = str(runtime)
        control.apply(proc.pid, patch)
        time.sleep(1.5)  # the parker thread calls park() again and is now inside the patch
        control.revert(proc.pid, "parked_patch")
        with pytest.raises(FentryError, match="busy: thread"):
            control.unload(proc.pid, "parked_patch")
        listing = control.list_patches(proc.pid)["patches"]
        assert [(p["name"], p["state"]) for p in listing] == [("parked_patch", "reverted")]
        assert "parked_patch.so" in maps_of(proc.pid)

        release.touch()  # the thread leaves the replacement and returns 101
        assert proc.stdout.readline() == "park returned 101\n"
        deadline = time.monotonic() + 10
        while True:
            try:
                control.unload(proc.pid, "parked_patch")
                break
            except FentryError as e:  # a stale return address may linger briefly
                assert "busy" in str(e)
                assert time.monotonic() < deadline, str(e)
                time.sleep(0.2)
        assert control.list_patches(proc.pid)["patches"] == []
        assert "parked_patch.so" not in maps_of(proc.pid)
        assert proc.stdout.readline() == "park returned 1\n"  # the original, still alive
        with pytest.raises(FentryError, match="no patch named parked_patch"):
            control.unload(proc.pid, "parked_patch")
    finally:
        os.environ.pop("FENTRY_RUNTIME_DIR", None)
        proc.kill()
        proc.wait()


def test_an_applied_patch_is_not_unloaded(tmp_path: Path) -> None:
    prog = build_program([PROGRAMS / "parked.c"], tmp_path / "parked")
    patch = build_patch(prog, PROGRAMS / "parked_patch.c", tmp_path / "parked_patch.so")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_RUNTIME_DIR": str(tmp_path / "run"),
                "PARK_RELEASE": str(tmp_path)})  # exists: the replacement never waits
    proc = subprocess.Popen([str(prog)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        os.environ["FENTRY_RUNTIME_DIR"] = str(tmp_path / "run")
        control.apply(proc.pid, patch)
        with pytest.raises(FentryError, match="revert it before unloading"):
            control.unload(proc.pid, "parked_patch")
        assert proc.poll() is None
    finally:
        os.environ.pop("FENTRY_RUNTIME_DIR", None)
        proc.kill()
        proc.wait()


# RSS may move by allocator fragmentation and lazily touched pages; a leak of even 100
# bytes per cycle would add ~900 KiB over the 9,000 measured cycles.
RSS_TOLERANCE_KIB = 512


@pytest.mark.parametrize("mode", ["jump", "dispatch"])
@pytest.mark.stress
def test_10000_apply_revert_unload_cycles_keep_rss_and_fds_flat(tmp_path: Path,
                                                                mode: str) -> None:
    prog = build_program([PROGRAMS / "cycles.c"], tmp_path / "cycles")
    patch = build_patch(prog, PROGRAMS / "cycles_patch.c", tmp_path / "cycles_patch.so")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_CONTROL": "0"})
    out = subprocess.run([str(prog), str(patch), "10000"], capture_output=True, text=True,
                         env=env, timeout=300)
    print(out.stdout)  # the figures: RSS and descriptors after warm-up and at the end
    assert out.returncode == 0, out.stdout + out.stderr
    f = dict(kv.split("=") for kv in out.stdout.split())
    assert f["mode"] == mode and f["cycles"] == "10000" and f["wrong"] == "0"
    assert f["fds_end"] == f["fds_after_warmup"]
    assert int(f["rss_kib_end"]) - int(f["rss_kib_after_warmup"]) <= RSS_TOLERANCE_KIB
