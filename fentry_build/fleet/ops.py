"""fleet/ops.py - the operations on one process, as the fleet commands run them: idempotent
where automation needs it, and each able to say what it would do (``--dry-run``).

Every function takes a pid and returns the process's reply with ``"changed"``, or raises
FentryError (ProcessRefused with the process's ``code``).  The transport - finding and
trusting the process's socket - is client/control.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fentry_build.binary.patchinfo import PatchInfo, patch_name
from fentry_build.client import control
from fentry_build.client.protocol import ProcessRefused

Reply = dict[str, Any]


def _named(patch: dict[str, Any], name: str) -> bool:
    """Does the loaded `patch` (an entry of list) answer to `name` (fix, fix.so or a path)?"""
    return bool(patch.get("name") == patch_name(Path(name)) or patch.get("path") == name)


def active_version(pid: int, name: str, timeout: float = control.DEFAULT_TIMEOUT) -> str | None:
    """The SHA-256 of the active version of patch `name` in the process ("" when the process
    does not say), None when it is not active there."""
    for p in control.list_patches(pid, timeout=timeout).get("patches", []):
        if _named(p, name) and p.get("state") == "active":
            return str(p.get("sha256") or "")
    return None


def apply(pid: int, patch: Path, info: PatchInfo | None, *, dry_run: bool = False,
          timeout: float = control.APPLY_TIMEOUT) -> Reply:
    """Apply `patch`; the version already active there changes nothing ("changed": false).

    With `info` (the patch read beforehand) the process's list is asked first, so that
    re-applying is a no-op whatever runtime the process has; the shim makes the same
    decision itself when the load request comes (a load of the active version answers
    "changed": false).
    """
    name = info.name if info else patch_name(patch)
    if info is not None or dry_run:
        have = active_version(pid, name, timeout=min(timeout, control.DEFAULT_TIMEOUT))
        if have is not None and info is not None and have == info.sha256:
            return {"ok": True, "name": name, "sha256": info.sha256, "functions": info.functions,
                    "changed": False, **({"dry_run": True} if dry_run else {})}
        if dry_run:
            return {"ok": True, "name": name, "sha256": info.sha256 if info else None,
                    "changed": True, "dry_run": True}
    reply = dict(control.apply(pid, patch, timeout=timeout))
    reply.setdefault("changed", True)
    return reply


def revert(pid: int, name: str, *, if_applied: bool = False, dry_run: bool = False,
           timeout: float = control.DEFAULT_TIMEOUT) -> Reply:
    """Revert patch `name`.  `if_applied`: a patch that is not active (or not loaded) is a
    success with "changed": false; otherwise that is the process's refusal."""
    if dry_run:
        active = active_version(pid, name, timeout=timeout) is not None
        if not active and not if_applied:
            raise ProcessRefused(f"revert {name} in pid {pid}: {patch_name(Path(name))} is not "
                                 "applied there", "wrong_state", {"ok": False})
        return {"ok": True, "name": patch_name(Path(name)), "changed": active, "dry_run": True}
    try:
        reply = dict(control.revert(pid, name, timeout=timeout))
    except ProcessRefused as e:
        if not if_applied or e.code not in ("no_such_patch", "wrong_state"):
            raise
        if e.code == "wrong_state" and active_version(pid, name, timeout=timeout) is not None:
            raise  # active, yet refused (a callback overran its limit): say so
        return {"ok": True, "name": patch_name(Path(name)), "changed": False}
    reply.setdefault("changed", True)
    return reply


def unload(pid: int, name: str, *, timeout: float = control.DEFAULT_TIMEOUT) -> Reply:
    reply = dict(control.unload(pid, name, timeout=timeout))
    reply.setdefault("changed", True)
    return reply


def list_patches(pid: int, *, timeout: float = control.DEFAULT_TIMEOUT) -> Reply:
    return dict(control.list_patches(pid, timeout=timeout))


def history(pid: int, *, timeout: float = control.DEFAULT_TIMEOUT) -> Reply:
    return dict(control.history(pid, timeout=timeout))


def status(pid: int, *, timeout: float = control.DEFAULT_TIMEOUT) -> Reply:
    return dict(control.status(pid, timeout=timeout))


__all__ = ["active_version", "apply", "history", "list_patches", "revert", "status", "unload"]
