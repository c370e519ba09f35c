"""Finding and trusting a process's control socket, before a byte is sent to it.

The socket's path depends on the process's environment at start (which /proc/PID/environ
no longer shows once the program changed or overwrote it), on whether it is setuid (the
shim then ignores the user's variables), and on its mount and pid namespaces.  So the path
is never computed.  Instead:

1. the target: /proc/PID/status - its state (a stopped process is refused at once: it
   could not answer, and a request would wait in its socket), its effective uid, and its
   pid in its own pid namespace (NSpid), which names its socket;
2. the socket it serves: among its own descriptors (/proc/PID/fd), the listening unix
   socket bound to ``<folder>/<its pid>.sock`` in the kernel's table of its network
   namespace (/proc/PID/net/unix), matched by inode;
3. reached through the process's root (/proc/PID/root), so another mount namespace (a
   private /tmp) is no obstacle: the folder is opened with O_PATH | O_NOFOLLOW, checked
   (a real folder, owned by the target's euid or root, not writable by group or others),
   and the socket is connected through that descriptor - the folder checked is the folder
   used;
4. the peer: SO_PEERCRED of the connection must be the target process (its pid as we see
   it) and the target's euid or root.

Anything else is a one-line refusal and nothing is sent.  When the process serves no
socket, the reason the shim published (a memfd named "fentry-control-off: ...") is the
message.  The rules are docs/security.md's "What the client checks".
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time

from fentry_build.client import procfs
from fentry_build.errors import FentryError
from fentry_build.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

OFF_MARKER = "/memfd:fentry-control-off: "
_SUN_PATH_MAX = 107


class NoChannel(FentryError):
    """The process serves no control channel; ``reason`` says why when it is known."""

    def __init__(self, pid: int, reason: str) -> None:
        super().__init__(f"process {pid} has no fentry control channel: {reason}")
        self.pid = pid
        self.reason = reason


class Target(Record):
    """A process as the client sees it (read from /proc once)."""

    __slots__ = ("pid", "own_pid", "euid", "state", "name")

    def __init__(self, pid: int, own_pid: int, euid: int, state: str, name: str) -> None:
        self.pid = pid          # in our pid namespace
        self.own_pid = own_pid  # in its own pid namespace: its socket is <folder>/<own_pid>.sock
        self.euid = euid
        self.state = state      # R, S, D, T, t, Z, ...
        self.name = name

    @classmethod
    def of(cls, pid: int) -> Target:
        st = procfs.read_status(pid)
        if st.tgid and st.tgid != pid:
            raise FentryError(f"{pid} is a thread of process {st.tgid}; give --pid {st.tgid}")
        if len(st.uids) < 2:
            raise FentryError(f"cannot read the uid of process {pid} from /proc/{pid}/status")
        return cls(pid, st.own_pid or pid, st.uids[1], st.state, st.name)

    def check_running(self) -> None:
        """Refuse at once a process that cannot answer (a request would wait in its socket).

        A traced process (strace) stops for an instant at each system call: it counts as
        stopped only if it still is after a few looks over 0.1 s.
        """
        state = self.state
        for _ in range(5):
            if state not in ("T", "t"):
                break
            time.sleep(0.02)
            state = procfs.read_status(self.pid).state
        if state in ("Z", "X"):
            raise FentryError(f"process {self.pid} has exited (state {state})")
        if state == "T":
            raise FentryError(f"process {self.pid} is stopped (state T), so it cannot answer; "
                              f"continue it (kill -CONT {self.pid}) and retry")
        if state == "t":
            raise FentryError(f"process {self.pid} is stopped by a debugger (state t), so it "
                              "cannot answer; continue it in the debugger and retry")


class Place(Record):
    """Where a target's socket is: its path as the target sees it, and how we reach it."""

    __slots__ = ("path", "reach")

    def __init__(self, path: str, reach: str) -> None:
        self.path = path    # e.g. /tmp/fentry-0/1234.sock, in the target's mount namespace
        self.reach = reach  # the folder as we open it: /proc/PID/root/<folder>, or <folder>

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def local_path(self) -> Path:
        """The socket's path from here (the target's own when it shares our mount namespace)."""
        from pathlib import Path

        return Path(self.reach) / self.name


def _denied(target: Target) -> FentryError:
    return FentryError(f"permission denied: process {target.pid} runs as uid {target.euid}; only "
                       "that user or root may control it")


def find(target: Target) -> Place:
    """The socket `target` serves; NoChannel (with the shim's reason if it left one) if none."""
    links = procfs.fd_links(target.pid)
    if links is None and os.geteuid() not in (0, target.euid):
        raise _denied(target)
    suffix = f"/{target.own_pid}.sock"
    listeners = [s for s in procfs.unix_listeners(target.pid) if s.path.endswith(suffix)]
    if links is not None:
        ours = procfs.socket_inodes(links)
        listeners = [s for s in listeners if s.inode in ours]
        if not listeners:
            for _, link in links:
                if link.startswith(OFF_MARKER):
                    reason = link[len(OFF_MARKER):]
                    raise NoChannel(target.pid, reason.removesuffix(" (deleted)"))
            raise NoChannel(target.pid, "it was not built with the fentry shim, or the shim has "
                            "not been loaded into it (fentry-build attach)")
    elif not listeners:
        # Not dumpable: its descriptors are hidden even from its own user.
        raise NoChannel(target.pid, "none is listening in its network namespace (its "
                        "descriptors cannot be read: the process is not dumpable)")
    path = listeners[0].path
    folder = os.path.dirname(path)
    if procfs.same_mount_namespace(target.pid) or links is None:
        return Place(path, folder)
    return Place(path, f"/proc/{target.pid}/root{folder}")


def _check_folder(target: Target, place: Place, fd: int) -> None:
    st = os.fstat(fd)
    where = f"{place.path}: its folder {place.folder}"
    if not stat.S_ISDIR(st.st_mode):
        raise FentryError(f"{where} is not a folder: refusing")
    if st.st_uid not in (target.euid, 0):
        raise FentryError(f"{where} belongs to uid {st.st_uid}, not to uid {target.euid} (process "
                          f"{target.pid}'s) or root: refusing")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FentryError(f"{where} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): refusing")
    try:
        sock = os.stat(place.name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        raise NoChannel(target.pid, f"{place.path} is gone (the process is exiting, or its "
                        "socket file was removed)") from None
    if not stat.S_ISSOCK(sock.st_mode):
        raise FentryError(f"{place.path} is not a socket: refusing")


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process that created the listening end of a connected socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", raw)
    return pid, uid


def _check_peer(target: Target, place: Place, sock: socket.socket) -> None:
    pid, uid = peer_credentials(sock)
    if pid == target.pid and uid in (target.euid, 0):
        return
    who = f"pid {pid}" if pid > 0 else "a process outside this pid namespace"
    raise FentryError(f"{place.path} is served by {who} of uid {uid}, not by process "
                      f"{target.pid}: refusing")


def _connect(sock: socket.socket, address: str, until: float) -> None:
    """connect(); a full backlog (EAGAIN: the process is busy) is retried until `until`."""
    while True:
        try:
            sock.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() >= until:
                raise TimeoutError from None
            time.sleep(0.01)


def connect(target: Target, timeout: float) -> tuple[socket.socket, Place]:
    """A connection to `target`'s control socket, checked as the module says; nothing sent."""
    target.check_running()
    place = find(target)
    try:
        fd = os.open(place.reach, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoChannel(target.pid, f"{place.folder} is gone") from None
    except NotADirectoryError:
        raise FentryError(f"{place.path}: its folder {place.folder} is a symlink or not a "
                          "folder: refusing") from None
    except PermissionError:
        raise _denied(target) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _check_folder(target, place, fd)
        address = f"/proc/self/fd/{fd}/{place.name}"
        if len(address) > _SUN_PATH_MAX:
            raise FentryError(f"{place.path}: the socket's name is too long to connect to")
        sock.settimeout(timeout)
        try:
            _connect(sock, address, time.monotonic() + timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoChannel(target.pid, f"nothing listens on {place.path} any more (the "
                            "process is exiting?)") from None
        except PermissionError:
            raise _denied(target) from None
        except TimeoutError:
            raise FentryError(f"process {target.pid} did not accept a connection within "
                              f"{timeout:g} s (its control channel is busy); nothing was "
                              "sent") from None
        except OSError as e:
            raise FentryError(f"cannot connect to {place.path}: {e.strerror or e}") from None
        _check_peer(target, place, sock)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    return sock, place


__all__ = ["NoChannel", "Place", "Target", "connect", "find", "peer_credentials"]
