"""client/control.py - the client of a running program's control channel (the shim's ``control/control.c``).

A program built with the fentry shim listens on ``<runtime dir>/<pid>.sock`` for JSON
requests, one per line, and answers each with one JSON line.  The runtime directory is
worked out from the *target's* environment, the way the shim did it: so that root, or a
user whose environment differs, reaches the same socket.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from fentry_build.client import procfs
from fentry_build.client.protocol import ProcessRefused, refusal_code
from fentry_build.errors import FentryError

DEFAULT_TIMEOUT = 10.0
APPLY_TIMEOUT = 60.0  # loading validates every site and syncs every core
REPLY_MAX = 64 * 1024 * 1024

Reply = dict[str, Any]  # the same as protocol.Reply


# ---- where the socket is -------------------------------------------------------------


def runtime_dir(env: dict[str, str], euid: int) -> Path:
    """The shim's rule: $FENTRY_RUNTIME_DIR, $XDG_RUNTIME_DIR/fentry, /tmp/fentry-<euid>."""
    explicit = env.get("FENTRY_RUNTIME_DIR", "")
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/"):
        return Path(xdg) / "fentry"
    return Path(f"/tmp/fentry-{euid}")


def socket_path(pid: int) -> Path:
    """The control socket of process ``pid``, from its environment (else ours)."""
    euid = procfs.effective_uid(pid)
    env = procfs.read_environ(pid)
    return runtime_dir(env if env is not None else dict(os.environ), euid) / f"{pid}.sock"


# ---- one request ---------------------------------------------------------------------


def _no_channel(pid: int) -> FentryError:
    return FentryError(
        f"process {pid} has no fentry control channel: it was not built with the fentry "
        "shim, or runs with FENTRY_CONTROL=0"
    )


def _connect_retrying(sock: socket.socket, path: Path, timeout: float) -> None:
    """connect(); a full backlog (EAGAIN: the process is busy) is retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.01)


def _connect(pid: int, path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _connect_retrying(sock, path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise _no_channel(pid) from None
    except PermissionError:
        sock.close()
        raise FentryError(
            f"permission denied: cannot connect to {path}; only the user process {pid} runs "
            "as (or root) may control it"
        ) from None
    except TimeoutError:
        sock.close()
        raise FentryError(f"process {pid} did not accept a connection within {timeout:g} s") from None
    except OSError as e:
        sock.close()
        raise FentryError(f"cannot connect to {path}: {e.strerror or e}") from None
    return sock


def _read_line(sock: socket.socket, pid: int, timeout: float) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise FentryError(f"process {pid} did not answer within {timeout:g} s") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise FentryError(f"process {pid} closed its control channel without answering")
        data += chunk
        if len(data) > REPLY_MAX:
            raise FentryError(f"process {pid} sent a reply longer than {REPLY_MAX} bytes")
    return bytes(data[: data.index(b"\n")])


def request(pid: int, obj: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Send one request to process ``pid`` and return its reply (``ok`` true or false)."""
    path = socket_path(pid)
    sock = _connect(pid, path, timeout)
    with sock:
        try:
            sock.sendall(json.dumps(obj).encode() + b"\n")
        except TimeoutError:
            raise FentryError(f"process {pid} did not take the request within {timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have refused us with a reply line: read it
        line = _read_line(sock, pid, timeout)
    try:
        reply = json.loads(line)
    except ValueError:
        raise FentryError(f"process {pid} sent a reply that is not JSON: {line[:200]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise FentryError(f"process {pid} sent a reply without \"ok\": {line[:200]!r}")
    return reply


def _checked(reply: Reply, what: str) -> Reply:
    if not reply["ok"]:
        raise ProcessRefused(f"{what}: {reply.get('error', 'failed (no reason given)')}",
                             refusal_code(reply), reply)
    return reply


# ---- the operations ------------------------------------------------------------------


def apply(pid: int, patch: Path) -> Reply:
    """Load the patch .so into process ``pid``; ``{"ok", "name", "functions"}``.

    The path sent is absolute (the process has its own working directory) but keeps the
    file's own name, symlink or not: the patch's name comes from it.
    """
    path = Path(os.path.abspath(patch))
    if not path.exists():
        raise FentryError(f"patch {patch} does not exist; build it first (meson compile patches)")
    if not path.is_file():
        raise FentryError(f"patch {patch} is not a regular file")
    reply = request(pid, {"op": "load", "path": str(path)}, timeout=APPLY_TIMEOUT)
    return _checked(reply, f"apply {path.name} to pid {pid}")


def revert(pid: int, name: str) -> Reply:
    """Revert the patch ``name`` in process ``pid``."""
    return _checked(request(pid, {"op": "revert", "name": name}), f"revert {name} in pid {pid}")


def unload(pid: int, name: str) -> Reply:
    """Unload the reverted patch ``name`` from process ``pid`` once no thread runs its code.

    A thread that may still be inside the patch makes the process answer "busy: ...",
    raised here as a FentryError; the patch then stays loaded and can be unloaded later.
    """
    return _checked(request(pid, {"op": "unload", "name": name}), f"unload {name} in pid {pid}")


def list_patches(pid: int) -> Reply:
    """The patches loaded into process ``pid``, oldest first."""
    return _checked(request(pid, {"op": "list"}), f"list the patches of pid {pid}")


def status(pid: int) -> Reply:
    """Process ``pid``'s program, build-id, mode and patch counts."""
    return _checked(request(pid, {"op": "status"}), f"status of pid {pid}")


# ---- for people ----------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_apply(reply: Reply) -> str:
    return f"applied {reply['name']} ({_plural(int(reply['functions']), 'function')} replaced)"


def format_revert(reply: Reply) -> str:
    return f"reverted {reply['name']}"


def format_unload(reply: Reply) -> str:
    return f"unloaded {reply['name']}"


def _format_function(func: dict[str, Any], patch_active: bool) -> str:
    where = f" ({func['file']})" if func.get("file") else ""
    if func.get("in_effect"):
        effect = "in effect"
    elif patch_active:
        effect = "not in effect: a newer patch replaces it"
    else:
        effect = "not in effect"
    return f"    {func['name']}{where}: {effect}"


def _format_patch(patch: dict[str, Any]) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(patch["applied_at"])))
    active = patch["state"] == "active"
    state = patch["state"] if active else f"{patch['state']} (still loaded)"
    lines = [f"{patch['name']}  {state}  applied {when}  {patch['path']}"]
    lines += [_format_function(f, active) for f in patch.get("functions", [])]
    return lines


def format_list(reply: Reply) -> str:
    patches = reply.get("patches", [])
    if not patches:
        return "no patches loaded"
    return "\n".join(line for p in patches for line in _format_patch(p))


def format_status(reply: Reply) -> str:
    rows = [
        ("pid", reply.get("pid")),
        ("program", reply.get("program") or "(unknown)"),
        ("build-id", reply.get("build_id") or "(none)"),
        ("mode", str(reply.get("mode") or "(unknown)")
         + (f" ({reply['mode_reason']})" if reply.get("mode_reason") else "")),
        ("patches", f"{reply.get('patches_active')} active, {reply.get('patches_loaded')} loaded"),
    ]
    return "\n".join(f"{key + ':':<10} {value}" for key, value in rows)


__all__ = [
    "apply",
    "revert",
    "unload",
    "list_patches",
    "status",
    "request",
    "socket_path",
    "runtime_dir",
    "format_apply",
    "format_revert",
    "format_unload",
    "format_list",
    "format_status",
]
