"""client/control.py - the client of a running program's control channel (docs/protocol.md).

A program built with the fentry shim serves a unix socket; each request is one JSON line,
each reply one JSON line.  Which socket, and whether to trust it, is channel.py's business:
nothing is sent before it found the socket the process really serves and checked its
folder and its peer.  Every request carries a deadline; past it the process refuses it
instead of carrying it out late (``expired``).

The operations are plain functions of a process - its pid, or a ``channel.Target`` read
once - so that tools handling many processes call them in a loop.
"""

from __future__ import annotations

import json
import os
import socket
import time

from fentry_build.client import channel
from fentry_build.client.channel import Target
from fentry_build.client.protocol import ProcessRefused, refusal_code
from fentry_build.errors import FentryError

# Neither typing nor pathlib at run time: this module is on the path of every command for
# one process (fentry_build/record.py says why).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike
    from pathlib import Path
    from typing import Any

    Reply = dict[str, Any]  # the same as protocol.Reply
    Process = int | Target

DEFAULT_TIMEOUT = 10.0
APPLY_TIMEOUT = 60.0  # loading validates every site and syncs every core
#: How long to wait, after the deadline, for the reply of a request the process took in
#: time: an operation it started keeps running (callbacks have their own limit, 5 s each).
STARTED_GRACE = 30.0
REPLY_MAX = 64 * 1024 * 1024


def target_of(process: Process) -> Target:
    return process if isinstance(process, Target) else Target.of(process)


def socket_path(process: Process) -> Path:
    """The control socket the process serves, as a path from here (channel.find)."""
    return channel.find(target_of(process)).local_path()


# ---- one request ---------------------------------------------------------------------


def _unread(sock: socket.socket) -> int:
    """Bytes we sent that the other end has not read yet (SIOCOUTQ); -1 if unknown."""
    import fcntl  # only past a deadline: two extension modules fewer at each command's start
    import termios

    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int.from_bytes(raw, "little", signed=True)
    except OSError:
        return -1


def _read_line(sock: socket.socket, pid: int, deadline: float, timeout: float) -> bytes:
    """The reply line; past the deadline, say whether the request can still take effect."""
    data = bytearray()
    grace_until: float | None = None
    while b"\n" not in data:
        now = time.time()
        until = deadline if grace_until is None else grace_until
        if now >= until:
            if grace_until is None and _unread(sock) != 0:
                raise FentryError(f"process {pid} did not take the request within {timeout:g} s; "
                                  "it expired and will not be carried out later")
            if grace_until is None:
                grace_until = deadline + STARTED_GRACE
                continue
            raise FentryError(f"process {pid} took the request in time but did not answer "
                              f"within {timeout + STARTED_GRACE:g} s; it may still be carried "
                              f"out - see fentry-build list --pid {pid}")
        sock.settimeout(max(until - now, 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise FentryError(f"process {pid} closed its control channel without answering")
        data += chunk
        if len(data) > REPLY_MAX:
            raise FentryError(f"process {pid} sent a reply longer than {REPLY_MAX} bytes")
    return bytes(data[: data.index(b"\n")])


def request(process: Process, obj: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Send one request and return the process's reply (``ok`` true or false).

    The request carries ``"deadline"`` = now + `timeout`: if the process has not come to it
    by then it refuses it (``expired``) rather than carrying it out late, so a request that
    timed out here never takes effect afterwards - unless the process had already taken it,
    which the error then says.
    """
    target = target_of(process)
    deadline = time.time() + timeout
    sock, _ = channel.connect(target, timeout)
    with sock:
        line = json.dumps({**obj, "deadline": round(deadline, 3)}).encode() + b"\n"
        try:
            sock.sendall(line)
        except TimeoutError:
            raise FentryError(f"process {target.pid} did not take the request within "
                              f"{timeout:g} s; it expired and will not be carried out later") from None
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have refused us with a reply line: read it
        raw = _read_line(sock, target.pid, deadline, timeout)
    try:
        reply = json.loads(raw)
    except ValueError:
        raise FentryError(f"process {target.pid} sent a reply that is not JSON: {raw[:200]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise FentryError(f"process {target.pid} sent a reply without \"ok\": {raw[:200]!r}")
    return reply


def _checked(reply: Reply, what: str) -> Reply:
    if not reply["ok"]:
        raise ProcessRefused(f"{what}: {reply.get('error', 'failed (no reason given)')}",
                             refusal_code(reply), reply)
    return reply


# ---- the operations ------------------------------------------------------------------


def _pid(process: Process) -> int:
    return process.pid if isinstance(process, Target) else process


def apply(process: Process, patch: str | PathLike[str], timeout: float = APPLY_TIMEOUT) -> Reply:
    """Load the patch .so into the process; ``{"ok", "name", "sha256", "functions"}``.

    The path sent is absolute (the process has its own working directory) but keeps the
    file's own name, symlink or not: the patch's name comes from it.
    """
    path = os.path.abspath(patch)
    if not os.path.exists(path):
        raise FentryError(f"patch {os.fspath(patch)} does not exist; build it first (meson "
                          "compile patches)")
    if not os.path.isfile(path):
        raise FentryError(f"patch {os.fspath(patch)} is not a regular file")
    reply = request(process, {"op": "load", "path": path}, timeout=timeout)
    return _checked(reply, f"apply {os.path.basename(path)} to pid {_pid(process)}")


def _patch_spelling(name: str) -> str:
    """A patch named by its name, its file name, or the path applied (made absolute, as
    apply sent it)."""
    return os.path.abspath(name) if "/" in name else name


def revert(process: Process, name: str, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Revert the patch ``name`` (name, ``name.so`` or the path applied) in the process."""
    return _checked(request(process, {"op": "revert", "name": _patch_spelling(name)}, timeout),
                    f"revert {name} in pid {_pid(process)}")


def unload(process: Process, name: str, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Unload the versions of patch ``name`` that are not active (reverted, or replaced by
    a newer version) from the process, once no thread can be running their code.

    A thread that may still be inside one makes the process answer "busy: ..."
    (ProcessRefused with code "busy"); that version then stays loaded and can be unloaded
    later.
    """
    return _checked(request(process, {"op": "unload", "name": _patch_spelling(name)}, timeout),
                    f"unload {name} in pid {_pid(process)}")


def list_patches(process: Process, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """The patches loaded into the process, oldest first."""
    return _checked(request(process, {"op": "list"}, timeout),
                    f"list the patches of pid {_pid(process)}")


def status(process: Process, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """The process's program, build-id, mode, patch counts and protocol version."""
    return _checked(request(process, {"op": "status"}, timeout), f"status of pid {_pid(process)}")


def history(process: Process, timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """The process's audit trail: every apply, revert and unload since it started."""
    reply = request(process, {"op": "history"}, timeout)
    if not reply["ok"] and reply.get("code") is None and "unknown op" in str(reply.get("error")):
        raise FentryError(f"process {_pid(process)} runs a fentry shim without an audit trail "
                          "(protocol 1); it keeps no history")
    return _checked(reply, f"history of pid {_pid(process)}")


# ---- for people ----------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _short(sha256: object) -> str:
    return str(sha256)[:12] if sha256 else "?"


def format_apply(reply: Reply) -> str:
    name, functions = reply["name"], _plural(int(reply["functions"]), "function")
    if reply.get("changed") is False:
        return f"{name} is already applied (version {_short(reply.get('sha256'))}): nothing changed"
    text = f"applied {name} ({functions} replaced)"
    old = reply.get("replaced")
    if isinstance(old, dict):
        text = (f"applied {name} version {_short(reply.get('sha256'))} ({functions}), replacing "
                f"version {_short(old.get('sha256'))} in one step; ")
        if old.get("unloaded"):
            text += "the old version was unloaded"
        else:
            text += (f"the old version stays loaded ({old.get('why') or 'busy'}); "
                     f"run unload {name} later to free it")
    return text


def _patch_name(spelled: object) -> str:
    """The patch's name however it was spelled: fix, fix.so or /path/to/fix.so."""
    name = os.path.basename(str(spelled))
    return name[:-3] if name.endswith(".so") and len(name) > 3 else name


def format_revert(reply: Reply) -> str:
    return f"reverted {_patch_name(reply['name'])}"


def format_unload(reply: Reply) -> str:
    return f"unloaded {_patch_name(reply['name'])}"


def _format_function(func: dict[str, Any], patch_active: bool) -> str:
    where = f" ({func['file']})" if func.get("file") else ""
    if func.get("in_effect"):
        effect = "in effect"
    elif patch_active:
        effect = "not in effect: a newer patch replaces it"
    else:
        effect = "not in effect"
    return f"    {func['name']}{where}: {effect}"


def _when(t: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(t)))) if t else "?"


_STATES = {"active": "active", "reverted": "reverted (still loaded)",
           "replaced": "replaced by a newer version (still loaded)"}


def _format_patch(patch: dict[str, Any]) -> list[str]:
    active = patch["state"] == "active"
    state = _STATES.get(str(patch["state"]), str(patch["state"]))
    lines = [f"{patch['name']}  {state}  version {_short(patch.get('sha256'))}  built "
             f"{_when(patch.get('built_at'))}  applied {_when(patch.get('applied_at'))}  "
             f"{patch['path']}"]
    lines += [_format_function(f, active) for f in patch.get("functions", [])]
    return lines


def format_list(reply: Reply) -> str:
    patches = reply.get("patches", [])
    if not patches:
        return "no patches loaded"
    return "\n".join(line for p in patches for line in _format_patch(p))


_VERBS = {"load": "apply", "revert": "revert", "unload": "unload", "connect": "connect"}


def _format_entry(e: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e["time"])))
    who = ("the program itself" if e["via"] == "api" else "FENTRY_PATCHES at start"
           if e["via"] == "start" else f"uid {e['peer_uid']} pid {e['peer_pid']}")
    what = _VERBS.get(str(e["op"]), str(e["op"]))
    if e.get("name"):
        what += f" {e['name']}"
    if e.get("path") and e["op"] == "load":
        what += f" ({e['path']}"
        what += f", sha256 {str(e['sha256'])[:16]})" if e.get("sha256") else ")"
    result = "done" if e["ok"] else f"refused ({e.get('code')}): {e.get('error')}"
    return f"{when}  {what}  by {who}: {result}"


def format_history(reply: Reply) -> str:
    entries = reply.get("history", [])
    lines = [_format_entry(e) for e in entries] or ["no apply, revert or unload so far"]
    if reply.get("dropped"):
        lines.insert(0, f"({reply['dropped']} older entries dropped; the newest "
                        f"{reply.get('kept')} are kept)")
    return "\n".join(lines)


def format_status(reply: Reply) -> str:
    rows = [
        ("pid", reply.get("pid")),
        ("program", reply.get("program") or "(unknown)"),
        ("build-id", reply.get("build_id") or "(none)"),
        ("mode", str(reply.get("mode") or "(unknown)")
         + (f" ({reply['mode_reason']})" if reply.get("mode_reason") else "")),
        ("sites", reply.get("sites") or "(unknown)"),
        *([("rewrites", f"impossible: {reply['rewrite_error']}; apply and revert are refused")]
          if reply.get("rewrite_error") else []),
        ("patches", f"{reply.get('patches_active')} active, {reply.get('patches_loaded')} loaded"),
        *_placement_rows(reply),
        ("protocol", reply.get("protocol", 1)),
    ]
    costs = reply.get("costs")
    if isinstance(costs, dict):
        rows += _cost_rows(costs)
    return "\n".join(f"{key + ':':<10} {value}" for key, value in rows)


def _placement_rows(reply: Reply) -> list[tuple[str, object]]:
    """Jump mode: where the patches' code lies (a site jumps straight only to code within 2 GiB)."""
    if reply.get("mode") != "jump" or not reply.get("patches_loaded"):
        return []
    if reply.get("far_reason"):
        return [("placement", f"far from the program ({reply['far_reason']}): patched sites go "
                              "through trampolines")]
    costs = reply.get("costs")
    direct = costs.get("sites_direct") if isinstance(costs, dict) else None
    return [("placement", "near the program" + (f": {direct} sites jump straight to their "
                                                "replacement" if direct is not None else ""))]


def _kib(n: object) -> str:
    return f"{int(str(n or 0)) / 1024:,.0f} KiB"


def _cost_rows(costs: dict[str, Any]) -> list[tuple[str, object]]:
    """status's "costs" for people: the start-up, the last operations, the memory held."""
    start = costs.get("startup") or {}
    rows: list[tuple[str, object]] = [
        ("start-up", f"{float(start.get('seconds', 0)) * 1e3:.1f} ms readying sites, "
                     f"{start.get('sites_written', 0)} written")]
    for key, label in (("last_apply", "apply"), ("last_revert", "revert"),
                       ("last_unload", "unload")):
        op = costs.get(key)
        if isinstance(op, dict):
            rows.append((label, f"{float(op.get('seconds', 0)) * 1e3:.1f} ms ({op.get('name')}, "
                                f"{'done' if op.get('ok') else 'refused'}, {_when(op.get('at'))})"))
    mem = costs.get("memory") or {}
    rows.append(("memory", f"tables {_kib(mem.get('tables'))}, trampolines "
                           f"{_kib(mem.get('trampolines'))}, site records {_kib(mem.get('sites'))}, "
                           f"patch copies {_kib(mem.get('patch_copies'))} (mapped "
                           f"{_kib(mem.get('patch_mappings'))})"))
    return rows


__all__ = [
    "DEFAULT_TIMEOUT",
    "APPLY_TIMEOUT",
    "apply",
    "revert",
    "unload",
    "list_patches",
    "status",
    "history",
    "request",
    "socket_path",
    "target_of",
    "format_apply",
    "format_revert",
    "format_unload",
    "format_list",
    "format_history",
    "format_status",
]
