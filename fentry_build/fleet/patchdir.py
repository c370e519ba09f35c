"""fleet/patchdir.py - the patch directory new processes load at start: where it is, and
``fentry-build install`` / ``uninstall``.

Layout: ``<dir>/<build-id>/<name>.so``.  A process with the shim loads, before ``main``, the
``*.so`` files of the folder named by its own build-id (in name order).  ``<dir>`` is
``$FENTRY_PATCH_DIR``, else ``/var/lib/fentry`` for root, else ``$XDG_DATA_HOME/fentry``
(``~/.local/share/fentry``) - the rule the shim follows, whose constants are in
shim/include/fentry.h (tests/test_facts.py holds this module to them).

A patch is installed atomically: written to a temporary file in its folder, flushed to disk,
given mode 0644, then renamed over the old one - a file is never rewritten in place, so a
process starting meanwhile loads the old version or the new one, never a mixture.  The
folders are checked as the shim checks them: real folders (not symlinks), owned by us or
root, not writable by group or others.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fentry_build.binary.patchinfo import PatchInfo, read_patch_file
from fentry_build.errors import FentryError

ENV = "FENTRY_PATCH_DIR"          # FENTRY_PATCH_DIR_ENV in fentry.h
SYSTEM_DIR = "/var/lib/fentry"    # FENTRY_PATCH_DIR_SYSTEM in fentry.h
USER_DIR_NAME = "fentry"          # FENTRY_PATCH_DIR_NAME in fentry.h: under the XDG data folder
FILE_MODE = 0o644
DIR_MODE = 0o755


def rule(env: Mapping[str, str], euid: int, secure: bool = False) -> Path | None:
    """The patch directory the shim uses in a process of effective uid `euid` started with
    `env` (shim/core/patchdir.c follows the same steps).  `secure`: the process runs with
    AT_SECURE (setuid, setgid, file capabilities) and ignores its environment: as root it
    uses the system folder, as another user none.  None when there is none (a relative
    $FENTRY_PATCH_DIR, no absolute $XDG_DATA_HOME or $HOME)."""
    explicit = "" if secure else env.get(ENV, "")
    if explicit:
        return Path(explicit) if explicit.startswith("/") else None
    if euid == 0:
        return Path(SYSTEM_DIR)
    if secure:
        return None
    xdg, home = env.get("XDG_DATA_HOME", ""), env.get("HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / USER_DIR_NAME
    if home.startswith("/"):
        return Path(home) / ".local" / "share" / USER_DIR_NAME
    return None


def patch_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """The patch directory of a process with environment `env` and effective uid `euid`
    (ours by default); a one-line error when the rule names none."""
    env = os.environ if env is None else env
    found = rule(env, os.geteuid() if euid is None else euid)
    if found is not None:
        return found
    explicit = env.get(ENV, "")
    if explicit:
        raise FentryError(f"{ENV}={explicit} is not an absolute path; give the folder's full path")
    raise FentryError(f"no patch directory: neither XDG_DATA_HOME nor HOME is an absolute path; "
                      f"set {ENV} to the folder")


def build_folder(base: Path, build_id: str) -> Path:
    return base / build_id


# ---- folder checks --------------------------------------------------------------------------


def check_folder(path: Path) -> None:
    """The shim's rule for a folder it loads from: a real folder, owned by us or root, not
    writable by group or others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FentryError(f"{path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise FentryError(f"{path} is a symbolic link; the patch directory must be a real folder "
                          f"(set {ENV} to the folder it points to)")
    if not stat.S_ISDIR(st.st_mode):
        raise FentryError(f"{path} is not a folder; remove it or set {ENV} elsewhere")
    if st.st_uid not in (os.geteuid(), 0):
        raise FentryError(f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} or root; "
                          "processes would not load from it: chown it, or set "
                          f"{ENV} elsewhere")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FentryError(f"{path} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); processes would not load from it: "
                          f"chmod go-w {path}")


def _ensure_folder(path: Path) -> None:
    """Create `path` (mode 0755) if missing, its parents too, then check it."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, DIR_MODE)
            os.chmod(path, DIR_MODE)  # whatever the umask
        except FileExistsError:
            pass  # made meanwhile by another install: checked below
        except PermissionError:
            raise FentryError(f"cannot create {path}: permission denied; install as its owner "
                              f"(root for {SYSTEM_DIR}), or set {ENV}") from None
    check_folder(path)


def _fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str | None:
    """SHA-256 of the regular file at `path` (not followed if a link); None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, OSError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_ok(path: Path) -> bool:
    st = os.lstat(path)
    return (stat.S_ISREG(st.st_mode) and st.st_uid in (os.geteuid(), 0)
            and stat.S_IMODE(st.st_mode) == FILE_MODE)


# ---- install --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """The outcome of install: where the patch is and whether anything changed."""

    info: PatchInfo
    path: Path                 # <dir>/<build-id>/<name>.so
    changed: bool
    previous: str | None       # SHA-256 of the version it replaced, if any

    def as_json(self) -> dict[str, object]:
        return {"name": self.info.name, "build_id": self.info.build_id, "sha256": self.info.sha256,
                "path": str(self.path), "changed": self.changed, "previous": self.previous}


def _write_atomically(folder: Path, final: Path, data: bytes) -> None:
    tmp = folder / f".{final.name}.{secrets.token_hex(6)}.tmp"  # never *.so: never loaded
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def install(patch: Path, *, base: Path | None = None, dry_run: bool = False) -> Installed:
    """Put `patch` into the patch directory (checked, atomically); the same version already
    there changes nothing."""
    info, data = read_patch_file(patch)
    base = patch_dir() if base is None else base
    folder = build_folder(base, info.build_id)
    final = folder / info.file_name
    previous = _digest(final)
    if previous == info.sha256 and _file_ok(final):
        check_folder(base)
        check_folder(folder)
        return Installed(info, final, False, None)
    if os.path.lexists(final) and os.path.isdir(final):
        raise FentryError(f"{final} is a folder; remove it, then install again")
    if dry_run:
        for path in (base, folder):
            if os.path.lexists(path):
                check_folder(path)
        return Installed(info, final, True, previous)
    _ensure_folder(base)
    _ensure_folder(folder)
    try:
        _write_atomically(folder, final, data)
    except PermissionError:
        raise FentryError(f"cannot write into {folder}: permission denied; install as its owner") from None
    except OSError as e:
        raise FentryError(f"cannot install {patch} into {folder}: {e.strerror or e}") from None
    return Installed(info, final, True, previous)


# ---- uninstall ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removed:
    name: str
    build_id: str
    path: Path
    sha256: str | None

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "build_id": self.build_id, "path": str(self.path),
                "sha256": self.sha256}


def file_name_of(name: str) -> str:
    """fix or fix.so -> fix.so; a path or an empty name is refused."""
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise FentryError(f"{name!r} is not a patch name; give its name (fix) or file name (fix.so)")
    return name if name.endswith(".so") else name + ".so"


def installed(base: Path | None = None) -> list[tuple[str, Path]]:
    """(build-id, file) of every patch in the patch directory."""
    base = patch_dir() if base is None else base
    found = []
    try:
        folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for folder in folders:
        found += [(folder.name, f) for f in sorted(folder.glob("*.so"))]
    return found


def uninstall(name: str, *, build_id: str | None = None, base: Path | None = None,
              if_installed: bool = False, dry_run: bool = False) -> list[Removed]:
    """Remove patch `name` from the folder of `build_id` (else from every build's folder)."""
    file_name = file_name_of(name)
    base = patch_dir() if base is None else base
    here = [(b, f) for b, f in installed(base)
            if f.name == file_name and (build_id is None or b == build_id)]
    if not here:
        if if_installed:
            return []
        where = f"{base}/{build_id}" if build_id else str(base)
        others = ", ".join(f"{b}/{f.name}" for b, f in installed(base)) or "nothing"
        raise FentryError(f"{file_name} is not installed under {where} (installed there: "
                          f"{others}); nothing removed")
    removed = []
    for b, f in here:
        digest = _digest(f)
        if not dry_run:
            check_folder(f.parent)
            try:
                os.unlink(f)
            except PermissionError:
                raise FentryError(f"cannot remove {f}: permission denied; uninstall as its owner") from None
            _fsync_folder(f.parent)
        removed.append(Removed(file_name[:-3], b, f, digest))
    return removed


__all__ = ["ENV", "SYSTEM_DIR", "USER_DIR_NAME", "Installed", "Removed", "build_folder", "check_folder",
           "file_name_of", "install", "installed", "patch_dir", "uninstall"]
