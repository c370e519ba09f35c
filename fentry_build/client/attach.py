"""client/attach.py - ``fentry-build attach --pid PID``: bring the shim into a running process.

The program was built with the instrumentation flags but started without the shim, so
its calls of ``__fentry__`` go through a GOT slot to glibc's ``__fentry__`` (a gprof
helper that returns at once).  Attaching:

1. checks, without touching the process, that it may and should be done: the process
   exists and runs; we may ptrace it (uid, dumpable, Yama, not already traced, no
   seccomp filter that could kill it during dlopen); it does not have the shim yet
   (linked, preloaded or attached before: then nothing is done); it is instrumented
   (a GOT slot relocated against ``__fentry__``); the shared shim is readable from the
   process's mount namespace and by its user;
2. works out from /proc/PID/maps and the mapped ELF files (pyelftools) every address
   gdb will need: the GOT slots, glibc's dlopen & co., and which code is the C runtime;
3. runs gdb (``attach_gdb.py``), which loads the shim with dlopen in a thread stopped at
   a safe point and then points the GOT slots at the shim's ``__fentry__`` with every
   thread stopped (docs/modes.md explains why this is safe);
4. waits for the shim's control channel to answer ``status``.

The steps live in their own modules, each a plain function the tests call directly:
procfs (the process), mapped (its ELF files), attach_checks (1), attach_plan (2, the
typed plan), and here the runner (3, 4) and the command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fentry_build.build import sharedshim
from fentry_build.client import control, procfs
from fentry_build.client.attach_checks import (
    check_attachable, check_library_reachable, check_permission, foreign_fentry, shim_presence,
)
from fentry_build.client.attach_plan import DEFAULT_TRIES, SYMBOLS, AttachPlan, build_plan
from fentry_build.client.mapped import loaded_objects
from fentry_build.errors import FentryError

GDB_SCRIPT = Path(__file__).resolve().parent / "attach_gdb.py"
CHANNEL_WAIT = 10.0   # seconds for the control channel to answer after the attach
GDB_TIMEOUT = 120.0   # the gdb script's own retries are bounded well below this


# ---- running gdb -------------------------------------------------------------------------


def _gdb_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "DEBUGINFOD")) and k != "LD_PRELOAD"}
    env["LC_ALL"] = "C"
    return env


def run_gdb(plan: AttachPlan, timeout: float = GDB_TIMEOUT) -> dict[str, Any]:
    gdb = shutil.which("gdb")
    if gdb is None:
        raise FentryError("attach needs gdb (apt-get install gdb), or start the program with "
                          "LD_PRELOAD=$(fentry-build shim-path)")
    with tempfile.TemporaryDirectory(prefix="fentry-attach-") as tmp:
        result_path = Path(tmp) / "result.json"
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan.to_json(result_path)))
        env = _gdb_env()
        env["FENTRY_ATTACH_PLAN"] = str(plan_path)
        cmd = [gdb, "-nx", "-nh", "-q", "-batch", "-x", str(GDB_SCRIPT)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace",
                                  timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FentryError(f"gdb did not finish attaching to process {plan.pid} within "
                              f"{timeout:g} s; the process may be left stopped or damaged") from None
        if not result_path.exists():
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise FentryError(f"gdb failed before attaching to process {plan.pid}: {last}")
        result: dict[str, Any] = json.loads(result_path.read_text())
        result["gdb_stderr"] = proc.stderr[-4000:]
        return result


def _explain(pid: int, result: dict[str, Any]) -> FentryError:
    stage, error = result.get("stage", "?"), result.get("error", "failed")
    if stage == "attach":
        if "not permitted" in error:
            hint = ("ptrace is not permitted: another user's process, Yama "
                    "(kernel.yama.ptrace_scope), a seccomp filter or a container without "
                    "CAP_SYS_PTRACE")
            return FentryError(f"cannot attach to process {pid}: {hint}; the process was not touched")
        return FentryError(f"cannot attach to process {pid}: {error}; the process was not touched")
    if stage == "safe-point":
        return FentryError(f"attach to process {pid} gave up: {error}; the process was not "
                           "changed - try again")
    return FentryError(f"attach to process {pid} failed ({stage}): {error}")


def _wait_for_channel(pid: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return control.status(pid)
        except FentryError as e:
            if time.monotonic() >= deadline:
                raise FentryError(f"the shim was loaded into process {pid} but its control "
                                  f"channel does not answer ({e}); see the program's stderr") from None
            time.sleep(0.05)


# ---- the command ------------------------------------------------------------------------


def attach(pid: int, *, library: Path | None = None, tries: int = DEFAULT_TRIES) -> dict[str, Any]:
    """Bring the shim into process `pid`.  Returns a report (``attached`` false when the
    shim was already there and nothing was done); raises FentryError with one line,
    leaving the process untouched, when it cannot be done."""
    st = procfs.read_status(pid)
    check_permission(pid, st)
    maps = procfs.read_maps(pid)
    objects = loaded_objects(pid, maps, SYMBOLS)
    main = next((o for o in objects if o.is_main), None)
    program = main.path if main else os.path.realpath(f"/proc/{pid}/exe")
    presence = shim_presence(pid, objects)
    if presence is not None and not presence.unswitched:
        return {"attached": False, "pid": pid, "program": program,
                "message": f"process {pid} already has the fentry shim ({presence.where}); "
                           "nothing to do - use fentry-build apply"}
    other = foreign_fentry(objects)
    if other is not None:
        raise FentryError(f"process {pid} uses the __fentry__ of {other.path}, which is not the "
                          "fentry shim; attach leaves it alone")
    if not any(o.fentry_slots for o in objects):
        raise FentryError(f"process {pid} ({program}) is not instrumented: nothing in it calls "
                          "__fentry__ through a GOT slot; build it with -pg -mfentry (Meson: "
                          "instrument_dep) and without the shim")
    check_attachable(pid, st)
    lib = library if library is not None else sharedshim.shim_path()
    lib = Path(os.path.abspath(lib))
    if presence is None:
        check_library_reachable(pid, lib, st)
    plan = build_plan(pid, maps, objects, lib, presence, tries)
    result = run_gdb(plan)
    if not result.get("ok"):
        raise _explain(pid, result)
    status = _wait_for_channel(pid, CHANNEL_WAIT)
    return {
        "attached": True,
        "pid": pid,
        "program": program,
        "library": str(lib) if presence is None else presence.where,
        "fentry": result.get("fentry"),
        "slots": len(result.get("slots", [])),
        "host_thread": result.get("host"),
        "tries": result.get("tries"),
        "mode": status.get("mode"),
        "socket": str(control.socket_path(pid)),
    }


def format_attach(report: dict[str, Any]) -> str:
    if not report["attached"]:
        return str(report["message"])
    slots = report["slots"]
    return (f"attached the fentry shim to process {report['pid']} ({report['program']}): "
            f"{slots} __fentry__ slot{'s' if slots != 1 else ''} switched to {report['library']}; "
            f"mode {report['mode']}; control channel {report['socket']}")


__all__ = ["attach", "format_attach", "run_gdb"]


if __name__ == "__main__":  # pragma: no cover - python -m fentry_build.client.attach PID
    print(format_attach(attach(int(sys.argv[1]))))
