"""build/sharedshim.py - the shim as a shared library, for the preload and attach modes.

The package is pure Python and carries the shim's *sources* (``paths.shim_dir()``), so
``libfentry.so`` is built on demand with gcc into a per-user cache folder:

    $XDG_CACHE_HOME/fentry_build/<version>-<hash>/libfentry.so   (default ~/.cache)
    /var/cache/fentry_build/<version>-<hash>/libfentry.so        (root, XDG_CACHE_HOME unset)

``<hash>`` covers every shim source and header, the compile flags and the compiler's
version, so a changed shim or compiler never reuses an old build.  The folders are made
by the user who runs the command, 0700 (0755 for root: a process of another user that
root attaches the shim to must be able to map it), and a folder or file that another
user could write is refused, never used.  The library is written under a temporary name
and renamed into place, so a concurrent reader sees no file or the whole file.

``fentry-build shim-path`` prints the path (building it first when needed):

    LD_PRELOAD=$(fentry-build shim-path) ./program
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from fentry_build import __version__, paths
from fentry_build.build.flags import SHIM_CFLAGS, SHIM_LIBS
from fentry_build.errors import FentryError

LIBRARY_NAME = "libfentry.so"

# -z defs: an undefined symbol fails the build, not the dlopen in a running program.
# -Bsymbolic: the shim's own references (e.g. &__fentry__) bind to itself even when it is
# dlopen()ed with RTLD_LOCAL behind glibc's __fentry__ (attach mode).
SHARED_LDFLAGS = ["-shared", "-Wl,-z,defs", "-Wl,-z,now", "-Wl,-z,relro", "-Wl,-Bsymbolic",
                  "-Wl,--build-id=sha1"]
SHARED_LIBS = [f"-l{lib}" for lib in SHIM_LIBS]

_SOURCE_SUFFIXES = (".c", ".S", ".h")


def shim_sources() -> list[Path]:
    """The shim's compiled sources: every .c and .S file under the shim folder (the same list
    as fentry_shim_sources in shim/meson.build, which tests/test_facts.py compares)."""
    d = paths.shim_dir()
    return sorted(p for p in d.rglob("*") if p.suffix in (".c", ".S") and p.is_file())


def _compiler_identity(cc: str) -> str:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise FentryError(f"{cc} not found: building the shared shim needs gcc "
                          "(apt-get install gcc libc6-dev)") from None
    return proc.stdout.splitlines()[0] if proc.stdout else cc


def sources_hash(cc: str = "gcc") -> str:
    """A digest of everything that decides the library's bytes."""
    h = hashlib.sha256()
    shim = paths.shim_dir()
    for p in sorted(shim.rglob("*")):
        if p.suffix in _SOURCE_SUFFIXES and p.is_file():
            h.update(p.relative_to(shim).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(SHIM_CFLAGS + SHARED_LDFLAGS + SHARED_LIBS).encode() + b"\0")
    h.update(_compiler_identity(cc).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """$XDG_CACHE_HOME/fentry_build, ~/.cache/fentry_build, or /var/cache/fentry_build (root)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / "fentry_build"
    if os.geteuid() == 0:
        return Path("/var/cache/fentry_build")
    return Path(os.path.expanduser("~")) / ".cache" / "fentry_build"


def _dir_mode() -> int:
    return 0o755 if os.geteuid() == 0 else 0o700


def _check_ours(path: Path, what: str) -> os.stat_result:
    """lstat `path`: it must be ours (not a symlink) and not writable by group or others."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise FentryError(f"{what} {path} is a symbolic link; remove it (fentry_build makes a real one)")
    if st.st_uid != os.geteuid():
        raise FentryError(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid "
                          f"{os.geteuid()}); remove it or set XDG_CACHE_HOME")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FentryError(f"{what} {path} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it or remove it")
    return st


def _check_parent(path: Path) -> None:
    """The folder our cache folder lives in must not let others replace it."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise FentryError(f"{path} is writable by group or others and not sticky: another user "
                          "could replace the cache; set XDG_CACHE_HOME to a private folder")


def _ensure_dir(path: Path) -> None:
    """Make `path` (and missing parents) as ours with the cache's mode; check it."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700 if os.geteuid() else 0o755, exist_ok=True)
    _check_parent(path.parent)
    try:
        path.mkdir(mode=_dir_mode())
    except FileExistsError:
        pass
    except OSError as e:
        raise FentryError(f"cannot create the cache folder {path}: {e.strerror or e}; "
                          "set XDG_CACHE_HOME to a folder you can write") from None
    _check_ours(path, "cache folder")


def library_path(cc: str = "gcc") -> Path:
    """Where the library for the current shim sources and compiler is (or will be) cached."""
    return cache_root() / f"{__version__}-{sources_hash(cc)}" / LIBRARY_NAME


def build_shared(out: Path, cc: str = "gcc") -> Path:
    """Compile the shim into the shared library `out` (written under a temporary name first)."""
    includes = [f"-I{d}" for d in paths.shim_include_dirs()]
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        tmp_out = Path(tmp) / LIBRARY_NAME
        cmd = [cc, *SHIM_CFLAGS, *SHARED_LDFLAGS, *includes,
               *map(str, shim_sources()), "-o", str(tmp_out), *SHARED_LIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln),
                         proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "")
            raise FentryError(f"building the shared shim failed: {first}")
        os.chmod(tmp_out, 0o644)  # the folder (0700 unless root) decides who reaches it
        os.replace(tmp_out, out)  # atomic: readers see no file or the complete one
    return out


def shim_path(*, rebuild: bool = False, cc: str = "gcc") -> Path:
    """The cached shared shim for this package version and these sources, built when missing."""
    if shutil.which(cc) is None:
        raise FentryError(f"{cc} not found: building the shared shim needs gcc "
                          "(apt-get install gcc libc6-dev)")
    lib = library_path(cc)
    _ensure_dir(lib.parent.parent)
    _ensure_dir(lib.parent)
    if not rebuild:
        try:
            st = _check_ours(lib, "cached shim")
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                return lib
        except FileNotFoundError:
            pass
    return build_shared(lib, cc)


__all__ = ["LIBRARY_NAME", "SHARED_LDFLAGS", "SHARED_LIBS", "build_shared", "cache_root",
           "library_path", "shim_path", "shim_sources", "sources_hash"]
