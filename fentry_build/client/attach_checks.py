"""client/attach_checks.py - what attach checks before it touches a process, and what it finds there.

Every check reads the process (procfs, its mapped files) and leaves it untouched; each
refusal is one line naming the cause and what to do.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fentry_build.client import control, procfs
from fentry_build.client.mapped import FENTRY, LoadedObject
from fentry_build.client.procfs import ProcStatus
from fentry_build.errors import FentryError

CAP_SYS_PTRACE = 19


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_permission(pid: int, st: ProcStatus) -> None:
    """Refuse (one line) when we may not ptrace `pid` or it cannot be attached now."""
    if st.state in ("Z", "X"):
        raise FentryError(f"process {pid} has exited (state {st.state})")
    if st.state in ("T", "t"):
        raise FentryError(f"process {pid} is stopped (state {st.state}); continue it first "
                          f"(kill -CONT {pid}) and attach again")
    privileged = procfs.has_capability(CAP_SYS_PTRACE)
    me = os.geteuid()
    if not privileged:
        # The kernel's rule for PTRACE_ATTACH: our real uid and gid equal the target's
        # real, effective and saved ones.
        if any(u != os.getuid() for u in st.uids[:3]) or any(g != os.getgid() for g in st.gids[:3]):
            owner = st.uids[1] if len(st.uids) > 1 else -1
            raise FentryError(f"process {pid} runs as {_user(owner)}; only that user or root may "
                              "attach to it (ptrace permission)")
        if os.stat(procfs.proc_dir(pid)).st_uid != me:
            raise FentryError(f"process {pid} is not dumpable (setuid, or prctl(PR_SET_DUMPABLE, "
                              "0)); only root may attach to it")


def yama_scope() -> int:
    """kernel.yama.ptrace_scope, 0 when Yama is not there."""
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return 0


def check_attachable(pid: int, st: ProcStatus) -> None:
    """The checks that matter only once we know the shim is not there yet."""
    if st.tracer:
        raise FentryError(f"process {pid} is already traced by pid {st.tracer} ({procfs.read_comm(st.tracer)}); "
                          "detach that debugger or tracer first")
    if st.seccomp == 1:
        raise FentryError(f"process {pid} runs in seccomp strict mode: dlopen in it would kill it")
    if st.seccomp == 2:
        raise FentryError(f"process {pid} runs under a seccomp filter, which may kill it for the "
                          "system calls dlopen and the control thread make; start it with "
                          "LD_PRELOAD=$(fentry-build shim-path) instead")
    scope = yama_scope()
    if scope >= 3:
        raise FentryError("ptrace is disabled on this system (kernel.yama.ptrace_scope=3); "
                          "start the program with LD_PRELOAD=$(fentry-build shim-path) instead")
    if scope == 2 and not procfs.has_capability(CAP_SYS_PTRACE):
        raise FentryError("only root may ptrace here (kernel.yama.ptrace_scope=2); run attach "
                          "as root")
    env = procfs.read_environ(pid) or {}
    if env.get("FENTRY_CONTROL") == "0":
        raise FentryError(f"process {pid} runs with FENTRY_CONTROL=0, so the shim would serve "
                          "no control channel; start it without that setting")


def _accessible(path: Path, uid: int, gid: int) -> bool:
    """Could a process of uid/gid open `path` for reading (plain mode bits, no ACLs)?"""
    if uid == 0:
        return True
    parts = [path, *path.parents]
    for i, p in enumerate(parts):
        st = os.stat(p)
        want = stat.S_IROTH if i == 0 else stat.S_IXOTH
        if st.st_uid == uid:
            want <<= 6
        elif st.st_gid == gid:
            want <<= 3
        if not st.st_mode & want:
            return False
    return True


def check_library_reachable(pid: int, lib: Path, st: ProcStatus) -> None:
    """The target opens the library by path, in its own mount namespace and as its user."""
    mine = os.stat(lib)
    try:
        theirs = os.stat(f"/proc/{pid}/root{lib}")
    except OSError:
        theirs = None
    if theirs is None or (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
        raise FentryError(f"process {pid} does not see {lib} (it runs in another mount "
                          "namespace, e.g. a container); attach from inside it")
    uid = st.uids[1] if len(st.uids) > 1 else 0
    gid = st.gids[1] if len(st.gids) > 1 else 0
    if not _accessible(lib, uid, gid):
        raise FentryError(f"process {pid} (as {_user(uid)}) cannot read {lib}; set "
                          "XDG_CACHE_HOME to a folder that user can read, or attach as that user")


# ---- what is already there ---------------------------------------------------------------


@dataclass
class ShimPresence:
    where: str            # "linked into the program", "loaded from /x/libfentry.so"
    fentry: int = 0       # run-time address of the shim's __fentry__ (0 when linked)
    unswitched: list[int] = field(default_factory=list)  # slots not pointing at it yet


def _channel_answers(pid: int) -> bool:
    try:
        control.request(pid, {"op": "status"}, timeout=2.0)
        return True
    except FentryError:
        return False


def shim_presence(pid: int, objects: list[LoadedObject]) -> ShimPresence | None:
    main = next((o for o in objects if o.is_main), None)
    if main is not None and main.defines_fentry:
        return ShimPresence("linked into the program")
    shim = next((o for o in objects if o.is_shim and not o.is_main), None)
    if shim is not None:
        fentry = shim.address(FENTRY)
        slots = [o.base + s for o in objects for s in o.fentry_slots]
        unswitched = [s for s in slots if procfs.read_mem_u64(pid, s) not in (fentry,)]
        return ShimPresence(f"loaded from {shim.path}", fentry, unswitched)
    if _channel_answers(pid):
        return ShimPresence("serving its control channel")
    return None


def foreign_fentry(objects: list[LoadedObject]) -> LoadedObject | None:
    """A __fentry__ that is neither glibc's nor the shim's (another profiler's)."""
    return next((o for o in objects if o.defines_fentry and not o.is_libc and not o.is_shim
                 and not o.is_main), None)


__all__ = ["ShimPresence", "check_attachable", "check_library_reachable", "check_permission",
           "foreign_fentry", "shim_presence", "yama_scope"]
