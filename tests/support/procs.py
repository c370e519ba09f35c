"""Starting a plain program (not one of ours) and knowing it runs: Popen returns once the
child is forked, while /proc still shows the Python that forked it until the exec."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

#: A bound on one exec on a loaded machine, not a speed requirement.
EXEC_TIMEOUT = 60.0


def spawn(argv: list[str] | list[bytes], **popen: Any) -> subprocess.Popen[bytes]:
    """Popen(argv), returned once /proc/PID/exe no longer names this Python."""
    ours = os.readlink("/proc/self/exe")
    proc = subprocess.Popen(argv, **popen)
    deadline = time.monotonic() + EXEC_TIMEOUT
    while os.readlink(f"/proc/{proc.pid}/exe") == ours:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{argv[0]!r} did not start")
        time.sleep(0.01)
    return proc
