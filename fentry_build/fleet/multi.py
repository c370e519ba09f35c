"""fleet/multi.py - one operation over many processes: each handled on its own, each
reported on its own line, and one exit status for all of them.

Exit status: 0 when every process succeeded, 3 when some did, 1 when none did (or no
process matched).  ``--json`` prints JSON Lines: one object per process, with ``"pid"``
and ``"ok"``, plus the operation's reply, or ``"error"`` and ``"code"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fentry_build.client.protocol import ProcessRefused
from fentry_build.errors import FentryError

Reply = dict[str, Any]

ALL_OK, NONE_OK, SOME_OK = 0, 1, 3
#: Processes handled at once: each waits mostly on its process, whose work is short.
WORKERS = 4


@dataclass
class Outcome:
    """What happened in one process."""

    pid: int
    ok: bool
    reply: Reply = field(default_factory=dict)
    error: str = ""
    code: str = ""

    def as_json(self) -> Reply:
        if self.ok:
            return {**self.reply, "pid": self.pid, "ok": True}
        return {"pid": self.pid, "ok": False, "error": self.error, "code": self.code or "failed"}

    @property
    def changed(self) -> bool:
        return self.ok and bool(self.reply.get("changed", False))


def _one(pid: int, op: Callable[[int], Reply]) -> Outcome:
    try:
        return Outcome(pid, True, op(pid))
    except ProcessRefused as e:
        return Outcome(pid, False, error=str(e), code=e.code)
    except FentryError as e:
        # Not the process's answer: no channel, refused by the client's checks, gone.
        return Outcome(pid, False, error=str(e), code="unreachable")


def run_each(pids: Iterable[int], op: Callable[[int], Reply], workers: int = WORKERS) -> list[Outcome]:
    """`op` on each process, independently; outcomes in the order of `pids`."""
    pids = list(pids)
    if len(pids) <= 1 or workers <= 1:
        return [_one(pid, op) for pid in pids]
    with ThreadPoolExecutor(max_workers=min(workers, len(pids))) as pool:
        return list(pool.map(lambda pid: _one(pid, op), pids))


def exit_status(outcomes: list[Outcome]) -> int:
    ok = sum(o.ok for o in outcomes)
    if outcomes and ok == len(outcomes):
        return ALL_OK
    return SOME_OK if ok else NONE_OK


def report(outcomes: list[Outcome], fmt: Callable[[Reply], str], *, as_json: bool) -> str:
    """One line per process (an indented block for list and status), or JSON Lines."""
    lines = []
    for o in outcomes:
        if as_json:
            lines.append(json.dumps(o.as_json(), sort_keys=True))
        elif not o.ok:
            lines.append(f"pid {o.pid}: error: {o.error}")
        else:
            text = fmt(o.reply)
            if "\n" in text:
                lines.append(f"pid {o.pid}:")
                lines += ["  " + line for line in text.splitlines()]
            else:
                lines.append(f"pid {o.pid}: {text}")
    return "\n".join(lines)


def summary(outcomes: list[Outcome], verb: str) -> str | None:
    """The one stderr line when some process failed, else None."""
    failed = sum(not o.ok for o in outcomes)
    if not failed:
        return None
    return f"{verb} failed in {failed} of {len(outcomes)} processes"


__all__ = ["ALL_OK", "NONE_OK", "SOME_OK", "Outcome", "exit_status", "report", "run_each", "summary"]
