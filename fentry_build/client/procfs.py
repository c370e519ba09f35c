"""client/procfs.py - the one reader of /proc for the client: a process's status, environment,
memory maps, name, memory, descriptors and unix sockets, and our own capabilities.

Both the control client (which socket the process serves) and attach (may we ptrace it,
what is mapped into it) read a target process through these functions.
"""

from __future__ import annotations

import os

from fentry_build.errors import FentryError
from fentry_build.record import Record

# No pathlib or typing here: the command line reads a process through this module
# before every request (record.py says why that matters).


class Mapping(Record):
    """One line of /proc/PID/maps."""

    __slots__ = ("start", "end", "perms", "offset", "inode", "path")

    def __init__(self, start: int, end: int, perms: str, offset: int, inode: int,
                 path: str) -> None:
        self.start = start
        self.end = end
        self.perms = perms
        self.offset = offset
        self.inode = inode
        self.path = path  # "" for anonymous memory; "[vdso]", "[stack]"...

    @property
    def executable(self) -> bool:
        return "x" in self.perms


class ProcStatus(Record):
    """What /proc/PID/status says about who the process is and what state it is in."""

    __slots__ = ("name", "state", "ppid", "tracer", "uids", "gids", "seccomp", "nspids", "tgid")

    def __init__(self, name: str, state: str, ppid: int, tracer: int, uids: tuple[int, ...],
                 gids: tuple[int, ...], seccomp: int, nspids: tuple[int, ...] = (),
                 tgid: int = 0) -> None:
        self.name = name
        self.state = state
        self.ppid = ppid
        self.tracer = tracer
        self.uids = uids      # real, effective, saved, fs
        self.gids = gids
        self.seccomp = seccomp
        self.nspids = nspids  # its pid in each pid namespace, ours first, its own last
        self.tgid = tgid      # the process a thread id belongs to (= pid for a process)

    @property
    def own_pid(self) -> int:
        """The pid the process has in its own pid namespace (what getpid() returns there)."""
        return self.nspids[-1] if self.nspids else 0


def proc_dir(pid: int) -> str:
    """/proc/PID; FentryError when there is no such process."""
    p = f"/proc/{pid}"
    if pid <= 0 or not os.path.isdir(p):
        raise FentryError(f"no process with pid {pid}")
    return p


def _read_text(path: str) -> str:
    """A /proc file as text.  Names and paths in it are bytes, not always UTF-8 (a program
    may name itself or its files anything): undecodable bytes become surrogates, as os.fsdecode
    makes them, so that they name the same files again."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def read_status(pid: int) -> ProcStatus:
    try:
        text = _read_text(f"{proc_dir(pid)}/status")
    except (FileNotFoundError, ProcessLookupError):
        raise FentryError(f"no process with pid {pid}") from None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcStatus(
        name=fields.get("Name", "?"),
        state=fields.get("State", "?").split()[0] if fields.get("State") else "?",
        ppid=int(fields.get("PPid", "0")),
        tracer=int(fields.get("TracerPid", "0")),
        uids=tuple(int(x) for x in fields.get("Uid", "").split()),
        gids=tuple(int(x) for x in fields.get("Gid", "").split()),
        seccomp=int(fields.get("Seccomp", "0")),
        nspids=tuple(int(x) for x in fields.get("NSpid", "").split()),
        tgid=int(fields.get("Tgid", "0")),
    )


def effective_uid(pid: int) -> int:
    """The effective uid of process `pid`."""
    uids = read_status(pid).uids
    if len(uids) < 2:
        raise FentryError(f"cannot read the uid of process {pid} from /proc/{pid}/status")
    return uids[1]


def read_environ(pid: int) -> dict[str, str] | None:
    """The environment the process started with, or None when we may not read it."""
    try:
        with open(f"{proc_dir(pid)}/environ", "rb") as f:
            raw = f.read()
    except (PermissionError, FileNotFoundError, ProcessLookupError):
        return None
    if not raw:  # a zombie, or a process that cleared it: nothing to go by
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return env


def read_maps(pid: int) -> list[Mapping]:
    try:
        text = _read_text(f"{proc_dir(pid)}/maps")
    except PermissionError:
        raise FentryError(f"cannot read /proc/{pid}/maps: permission denied; attach as the "
                          "user the process runs as, or as root") from None
    except (FileNotFoundError, ProcessLookupError):
        raise FentryError(f"no process with pid {pid}") from None
    maps = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        maps.append(Mapping(start, end, parts[1], int(parts[2], 16), int(parts[4]),
                            parts[5].strip() if len(parts) > 5 else ""))
    return maps


def read_comm(pid: int) -> str:
    """The process's name (/proc/PID/comm), "?" when it cannot be read."""
    try:
        return _read_text(f"/proc/{pid}/comm").strip()
    except OSError:
        return "?"


def read_mem_u64(pid: int, addr: int) -> int | None:
    """The 8 bytes at `addr` in process `pid` (little-endian), None when unreadable."""
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(addr)
            data = f.read(8)
        return int.from_bytes(data, "little") if len(data) == 8 else None
    except (OSError, OverflowError):
        return None


def fd_links(pid: int) -> list[tuple[int, str]] | None:
    """(fd, readlink of /proc/PID/fd/fd) for each open descriptor of `pid`; None when we may
    not look (another user's process, or one that is not dumpable)."""
    fds = f"{proc_dir(pid)}/fd"
    try:
        names = os.listdir(fds)
    except PermissionError:
        return None
    except (FileNotFoundError, ProcessLookupError):
        raise FentryError(f"no process with pid {pid}") from None
    links = []
    for name in names:
        try:
            links.append((int(name), os.readlink(f"{fds}/{name}")))
        except (OSError, ValueError):
            continue  # closed meanwhile
    return links


def socket_inodes(links: list[tuple[int, str]]) -> set[int]:
    """The inodes of the sockets among fd_links()."""
    return {int(target[8:-1]) for _, target in links
            if target.startswith("socket:[") and target.endswith("]")}


class UnixListener(Record):
    """A listening unix stream socket bound to a path (a line of /proc/PID/net/unix)."""

    __slots__ = ("inode", "path")

    def __init__(self, inode: int, path: str) -> None:
        self.inode = inode
        self.path = path  # as bound, in the binding process's mount namespace


_SO_ACCEPTCON = 0x10000
_SOCK_STREAM = 1


def unix_listeners(pid: int) -> list[UnixListener]:
    """The listening unix stream sockets with a path in the network namespace of `pid`."""
    try:
        text = _read_text(f"{proc_dir(pid)}/net/unix")
    except PermissionError:
        return []
    except (FileNotFoundError, ProcessLookupError):
        raise FentryError(f"no process with pid {pid}") from None
    found = []
    for line in text.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces)
        fields = line.split(None, 7)
        if (len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON
                and int(fields[4], 16) == _SOCK_STREAM and fields[7].startswith("/")):
            found.append(UnixListener(int(fields[6]), fields[7]))
    return found


def same_mount_namespace(pid: int) -> bool:
    """Does `pid` see the file system as we do (same mount namespace)?  False when unknown."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False


def pids() -> list[int]:
    """Every process id in /proc (ours included), in increasing order."""
    return sorted(int(e) for e in os.listdir("/proc") if e.isdigit())


def exe_link(pid: int) -> str:
    """/proc/PID/exe: opening it opens the very file the process runs, even if replaced."""
    return f"/proc/{pid}/exe"


def read_exe(pid: int) -> str | None:
    """The path of the executable `pid` runs (" (deleted)" removed), None when we may not see it."""
    try:
        return os.readlink(exe_link(pid)).removesuffix(" (deleted)")
    except OSError:
        return None


def in_root(pid: int, path: str) -> str:
    """`path` as process `pid` names it, reached through its root (its mount namespace)."""
    return f"/proc/{pid}/root{path}"


def has_capability(cap: int) -> bool:
    """Is capability number `cap` in our effective set (root without /proc: yes)?"""
    try:
        for line in _read_text("/proc/self/status").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0


__all__ = ["Mapping", "ProcStatus", "UnixListener", "effective_uid", "exe_link", "fd_links",
           "has_capability", "in_root", "pids", "proc_dir", "read_exe", "read_comm", "read_environ", "read_maps", "read_mem_u64", "read_status",
           "same_mount_namespace", "socket_inodes", "unix_listeners"]
