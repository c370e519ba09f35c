"""Starting a plain program (not one of ours) and knowing it runs: Popen returns once the
child is forked, while /proc still shows the Python that forked it until the exec."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

#: A bound on one exec on a loaded machine, not a speed requirement.
EXEC_TIMEOUT = 60.0


def _exe(pid: int) -> str | None:
    """What /proc/PID/exe names; None once the process has exited (a zombie has none)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def spawn(argv: list[str] | list[bytes], **popen: Any) -> subprocess.Popen[bytes]:
    """Popen(argv), returned once /proc/PID/exe no longer names this Python."""
    ours = os.readlink("/proc/self/exe")
    proc = subprocess.Popen(argv, **popen)
    deadline = time.monotonic() + EXEC_TIMEOUT
    while _exe(proc.pid) == ours:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{argv[0]!r} did not start")
        time.sleep(0.01)
    return proc
