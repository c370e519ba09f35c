"""fleet/ps.py - ``fentry-build ps``: every process with the shim, its build, mode and patches;
with ``--missing PATCH.so``, the processes of that patch's build that do not have that
version in effect."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fentry_build.binary.patchinfo import PatchInfo
from fentry_build.client import control
from fentry_build.errors import FentryError
from fentry_build.fleet import discover, multi

Reply = dict[str, Any]


@dataclass
class Row:
    """One process as ps shows it."""

    found: discover.Found
    mode: str = ""               # jump or dispatch; "" when unreachable
    mode_reason: str | None = None
    patches: list[Reply] = field(default_factory=list)
    error: str = ""              # why its channel could not be used
    missing: bool | None = None  # with --missing: lacks that version

    @property
    def reachable(self) -> bool:
        return not self.error

    def as_json(self) -> Reply:
        f = self.found
        obj: Reply = {"pid": f.pid, "program": f.program, "build_id": f.build_id, "how": f.how,
                      "reachable": self.reachable, "mode": self.mode or None,
                      "mode_reason": self.mode_reason, "patches": self.patches}
        if self.error:
            obj["error"] = self.error
        if self.missing is not None:
            obj["missing"] = self.missing
        return obj


def _has(row: Row, info: PatchInfo) -> bool:
    return any(p.get("name") == info.name and p.get("state") == "active"
               and p.get("sha256") == info.sha256 for p in row.patches)


def _fill(found: discover.Found, timeout: float) -> Row:
    row = Row(found)
    try:
        status = control.status(found.pid, timeout=timeout)
        row.mode, row.mode_reason = str(status.get("mode") or "?"), status.get("mode_reason")
        row.patches = [{k: p.get(k) for k in ("name", "state", "sha256", "path", "applied_at")}
                       for p in control.list_patches(found.pid, timeout=timeout).get("patches", [])]
    except FentryError as e:
        row.error = str(e)
    return row


def ps(*, program: str | None = None, build_id: str | None = None,
       missing: PatchInfo | None = None, timeout: float = control.DEFAULT_TIMEOUT) -> list[Row]:
    """The rows of ps: every process we may see that carries the shim, filtered; with
    `missing`, only those of its build that lack its version (unreachable ones included)."""
    if missing is not None:
        if build_id is not None and build_id != missing.build_id:
            raise FentryError(f"--build-id {build_id} contradicts --missing {missing.path}, which is "
                              f"for build {missing.build_id}; leave --build-id out")
        build_id = missing.build_id
    found = discover.scan(program=program, build_id=build_id)
    with ThreadPoolExecutor(max_workers=multi.WORKERS) as pool:
        rows = list(pool.map(lambda f: _fill(f, timeout), found))
    if missing is not None:
        for r in rows:
            r.missing = not (r.reachable and _has(r, missing))
        rows = [r for r in rows if r.missing]
    return rows


def _patch_text(p: Reply) -> str:
    return f"{p.get('name')}({p.get('state')} {str(p.get('sha256') or '?')[:12]})"


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'PID':>7}  {'MODE':<19} {'BUILD-ID':<12}  {'PROGRAM'}  PATCHES"]
    for r in rows:
        f = r.found
        mode = f"{r.mode or '-'}, {f.how}"
        what = (f"unreachable: {r.error}" if r.error
                else ", ".join(_patch_text(p) for p in r.patches) or "none")
        lines.append(f"{f.pid:>7}  {mode:<19} {(f.build_id or '(none)')[:12]:<12}  {f.program}  {what}")
    return "\n".join(lines)


def format_json(rows: list[Row]) -> str:
    return "\n".join(json.dumps(r.as_json(), sort_keys=True) for r in rows)


__all__ = ["Row", "format_json", "format_rows", "ps"]
