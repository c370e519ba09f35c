"""A request is never carried out after its deadline (issue 11 §6, the shim side).

The control thread refuses a request whose deadline passed before it came to it (see
tests/test_control_proto.py); the loader refuses one whose deadline passed while it
waited for the loader - here, for an apply the program makes itself, whose pre-patch
callback takes two seconds.  Real program, real socket, both modes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from fentry_build.client import control

from support.builds import PROGRAMS, build_patch, build_program
from support.servers import MODES


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("deadline")
    prog = build_program([PROGRAMS / "unload_designs.c"], d / "unload_designs")
    slow = build_patch(prog, PROGRAMS / "slow_callback_patch.c", d / "slow_callback_patch.so")
    other = build_patch(prog, PROGRAMS / "unload_designs_patch.c", d / "unload_designs_patch.so")
    return prog, slow, other


@pytest.mark.parametrize("mode", MODES)
def test_a_request_that_waited_for_the_loader_past_its_deadline_is_not_carried_out(
        slow: tuple[Path, Path, Path], tmp_path: Path, mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prog, slow_patch, other = slow
    (tmp_path / "release").touch()
    runtime = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": mode, "FENTRY_RUNTIME_DIR": str(runtime),
                "PARK_RELEASE": str(tmp_path / "release")})
    monkeypatch.setenv("FENTRY_RUNTIME_DIR", str(runtime))
    proc = subprocess.Popen([str(prog), "maps", str(slow_patch), "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        while proc.stdout.readline() != "ready\n":
            pass
        proc.stdin.write("apply\n")  # the program's own apply: two seconds in its callback
        proc.stdin.flush()
        time.sleep(0.5)
        # The client's deadline is its timeout: the process takes the request at once, then
        # waits for the program's apply; the client waits on for the answer (its grace).
        reply = control.request(proc.pid, {"op": "load", "path": str(other)}, timeout=0.3)
        assert reply["ok"] is False and reply["code"] == "expired", reply
        assert "while it waited for another change" in reply["error"], reply
        while (line := proc.stdout.readline()) != "apply ok\n":
            assert line.startswith("park returned"), line
        patches = control.list_patches(proc.pid)["patches"]
        assert [(p["name"], p["state"]) for p in patches] == [("slow_callback_patch", "active")]
        while (line := proc.stdout.readline()) != "park returned 301\n":
            assert line == "park returned 1\n", line
        # With time enough, the same request just waits its turn.
        assert control.request(proc.pid, {"op": "load", "path": str(other)}, timeout=30)["ok"]
    finally:
        proc.kill()
        proc.wait()
