"""client/attach_plan.py - the plan attach hands to the gdb script: typed here, JSON on the way.

fentry_build.client.attach works out, from /proc and the mapped ELF files, every address the
gdb side needs and writes it as an AttachPlan; attach_gdb.py (which runs inside gdb with
only the standard library) reads the JSON.  PLAN_VERSION is in both files: the gdb side
refuses a plan of another version (tests/test_modes.py checks the two agree).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fentry_build.client.attach_checks import ShimPresence
from fentry_build.client.mapped import FENTRY, LoadedObject
from fentry_build.client.procfs import Mapping
from fentry_build.errors import FentryError

PLAN_VERSION = 1

# C-library functions a thread may be stopped in and still host dlopen(): they take no
# lock (blocking system-call wrappers called by the program itself), plus glibc's
# profiling entry points that an unlinked instrumented program calls all the time.
LEAF_FUNCTIONS = frozenset({
    "__fentry__", "_mcount", "mcount",
    "accept", "accept4", "connect", "read", "readv", "write", "writev", "pread", "pread64",
    "pwrite", "pwrite64", "recv", "recvfrom", "recvmsg", "recvmmsg", "send", "sendto",
    "sendmsg", "sendmmsg", "poll", "ppoll", "select", "pselect", "epoll_wait", "epoll_pwait",
    "epoll_pwait2", "nanosleep", "clock_nanosleep", "usleep", "sleep", "pause", "sigsuspend",
    "sigwait", "sigwaitinfo", "sigtimedwait", "wait", "waitpid", "wait3", "wait4", "waitid", "msgrcv",
    "msgsnd", "semop", "semtimedop", "syscall", "fsync", "fdatasync", "clock_gettime",
    "gettimeofday", "time",
})
# What gdb calls in the target, from the C library.
TARGET_FUNCTIONS = ("dlopen", "dlerror", "dlsym", "pthread_sigmask", "pthread_setcancelstate")

#: The dynamic symbols the plan reads of the mapped objects (mapped.loaded_objects()).
SYMBOLS = LEAF_FUNCTIONS | frozenset(TARGET_FUNCTIONS)

DEFAULT_TRIES = 60

Range = list[Any]  # [start, end, label]: run-time addresses, end excluded
Slot = dict[str, Any]  # {"addr": GOT slot, "module": path, "accept": [[lo, hi], ...]}


@dataclass
class AttachPlan:
    """Everything the gdb script needs, in run-time addresses of the target process."""

    pid: int
    library: str                  # the shared shim to dlopen
    functions: dict[str, int]     # the C library's dlopen, dlerror, dlsym, ...
    ranges: dict[str, list[Range]]  # "runtime", "leaf", "ldso", "entry": what code is where
    slots: list[Slot]             # the __fentry__ GOT slots to switch
    fentry: int = 0               # the shim's __fentry__ when it is there already
    tries: int = DEFAULT_TRIES    # times to look for a safe point
    pause: float = 0.02           # seconds the program runs between two tries
    stack_min: int = 65536        # stack room the host thread needs for dlopen
    version: int = PLAN_VERSION

    def to_json(self, result: Path) -> dict[str, Any]:
        """The JSON object attach_gdb.py reads; `result` is where it writes its answer."""
        return dict(asdict(self), result=str(result))


def build_plan(pid: int, maps: list[Mapping], objects: list[LoadedObject], library: Path,
               presence: ShimPresence | None = None, tries: int = DEFAULT_TRIES) -> AttachPlan:
    """The plan for `pid`: where everything gdb needs is in the process, and what to switch."""
    libc = next((o for o in objects if o.is_libc), None)
    if libc is None:
        raise FentryError(f"process {pid} has no C library mapped (statically linked?); "
                          "attach needs glibc's dlopen")
    runtime: list[Range] = []
    leaf: list[Range] = []
    ldso: list[Range] = []
    entry: list[Range] = []
    for o in objects:
        name = Path(o.path).name
        if o.is_runtime:
            runtime += [[s, e, name] for s, e in o.exec_ranges]
        if o.is_ldso:
            ldso += [[s, e, name] for s, e in o.exec_ranges]
        if o.is_main:
            start, size = o.start_sym if o.start_sym else (o.entry, 64)
            entry.append([o.base + start, o.base + start + max(size, 1), "_start"])
    for fname in sorted(LEAF_FUNCTIONS):
        for value, size, _ in libc.definitions(fname):
            if size:
                leaf.append([libc.base + value, libc.base + value + size, fname])
    leaf += [[m.start, m.end, "vdso"] for m in maps if m.path == "[vdso]"]
    # Leaf extents lie inside libc's runtime ranges: the classifier looks at leaf first.
    glibc_fentry = libc.address(FENTRY) if libc.defines(FENTRY) else 0
    slots: list[Slot] = []
    for o in objects:
        for s in o.fentry_slots:
            accept: list[list[int]] = []
            if glibc_fentry:
                accept.append([glibc_fentry, glibc_fentry + 1])
            accept += [[lo, hi] for lo, hi in o.exec_ranges]  # a lazy slot: still its PLT
            slots.append({"addr": o.base + s, "module": o.path, "accept": accept})
    if presence is not None:
        slots = [s for s in slots if s["addr"] in presence.unswitched]
    return AttachPlan(
        pid=pid,
        library=str(library),
        functions={f: libc.address(f) for f in TARGET_FUNCTIONS},
        ranges={"runtime": runtime, "leaf": _dedupe(leaf), "ldso": ldso, "entry": entry},
        slots=slots,
        fentry=presence.fentry if presence is not None else 0,
        tries=max(1, tries),
    )


def _dedupe(ranges: list[list[Any]]) -> list[list[Any]]:
    """Sorted ranges without overlaps (aliases of one function appear once)."""
    out: list[list[Any]] = []
    for s, e, label in sorted(ranges):
        if out and s < out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
            continue
        out.append([s, e, label])
    return out


__all__ = ["DEFAULT_TRIES", "LEAF_FUNCTIONS", "PLAN_VERSION", "SYMBOLS", "TARGET_FUNCTIONS",
           "AttachPlan", "build_plan"]
