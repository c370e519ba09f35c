"""build/ldwrap.py - the linker wrapper that prepares a program's fentry sites as it is linked.

Meson links an executable in one step, so the post-link step of build/prepare.py rides on
the link itself: ``dependency('fentry')`` adds ``-B<dir>/`` to the program's link line, and
gcc then runs the ``ld`` (or ``ld.bfd``, ``ld.gold``, ...) it finds in <dir>: a small script
written by ``python -m fentry_build.build.ldwrap --write DIR`` at configure time, which runs
the real linker with the same arguments and then prepares the output (only an executable
that calls its own __fentry__; anything else is left as linked).

The real linker is the next one of the same name on gcc's program path (COMPILER_PATH,
then PATH), never this folder's.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from fentry_build.errors import FentryError

# The names gcc runs the linker by (-fuse-ld=bfd, gold, lld, mold, or none).
LINKER_NAMES = ("ld", "ld.bfd", "ld.gold", "ld.lld", "ld.mold")

_SCRIPT = """#!{python}
# Written by fentry_build (python -m fentry_build.build.ldwrap --write): the linker, then
# the program's fentry sites prepared (docs/how-it-works.md, "Sites prepared at build time").
import sys
from fentry_build.build.ldwrap import run
sys.exit(run(sys.argv))
"""


def write(folder: Path, python: str = sys.executable) -> list[Path]:
    """Write the wrapper under every linker name into `folder` (mode 0755)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = _SCRIPT.format(python=python)
    written = []
    for name in LINKER_NAMES:
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, path)
        written.append(path)
    return written


def real_linker(name: str, own: Path) -> str:
    """The linker gcc would have run without our folder: COMPILER_PATH, then PATH."""
    dirs = [*os.environ.get("COMPILER_PATH", "").split(os.pathsep),
            *os.environ.get("PATH", "").split(os.pathsep)]
    for d in dirs:
        if not d:
            continue
        candidate = Path(d) / name
        try:
            if candidate.resolve().parent == own.resolve():
                continue
        except OSError:
            continue
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FentryError(f"no {name} besides fentry's wrapper on the program path; "
                      "install binutils (or the linker -fuse-ld names)")


def expanded(args: list[str], depth: int = 0) -> list[str]:
    """The arguments with @FILE response files read in (gcc passes them on when it got one)."""
    out: list[str] = []
    for a in args:
        if a.startswith("@") and depth < 8 and Path(a[1:]).is_file():
            out += expanded(shlex.split(Path(a[1:]).read_text()), depth + 1)
        else:
            out.append(a)
    return out


def output_of(args: list[str]) -> Path | None:
    """The file the linker writes (-o FILE, -oFILE, --output=FILE); a.out by default."""
    for i, a in enumerate(args):
        if a in ("-o", "--output") and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--output="):
            return Path(a.split("=", 1)[1])
        if a.startswith("-o") and len(a) > 2 and not a.startswith("-o-"):
            return Path(a[2:])
    if "-r" in args or "--relocatable" in args:
        return None
    return Path("a.out")


def run(argv: list[str]) -> int:
    """The wrapper's body: link, then prepare what was linked."""
    me = Path(argv[0])
    try:
        linker = real_linker(me.name, me.parent)
    except FentryError as e:
        print(f"fentry-ld: error: {e}", file=sys.stderr)
        return 1
    rc = subprocess.run([linker, *argv[1:]]).returncode
    args = expanded(argv[1:])
    out = output_of(args)
    if rc != 0 or out is None or "-shared" in args or "-r" in args:
        return rc
    from fentry_build.build.prepare import prepare  # only when there is something to do

    try:
        prepare(out)
    except FentryError as e:
        print(f"fentry-ld: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fentry_build.build.ldwrap",
                                 description="Write the linker wrapper that prepares fentry "
                                             "sites (used by the Meson subproject).")
    ap.add_argument("--write", type=Path, required=True, metavar="DIR",
                    help="the folder to write ld, ld.bfd, ... into (give it to gcc as -BDIR/)")
    ap.add_argument("--stamp", type=Path, default=None,
                    help="a file to write once done (what Meson's configure_file expects)")
    args = ap.parse_args(argv)
    written = write(args.write)
    if args.stamp:
        args.stamp.write_text("\n".join(str(p) for p in written) + "\n")
    mode = stat.S_IMODE(written[0].stat().st_mode)
    return 0 if mode & 0o111 else 1


if __name__ == "__main__":
    sys.exit(main())
