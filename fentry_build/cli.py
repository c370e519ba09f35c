"""The ``fentry-build`` command: a thin layer over functions the tests call too."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fentry_build import __version__
from fentry_build.errors import FentryError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time (fentry_build/record.py says why)
    from collections.abc import Callable, Sequence
    from typing import Any

    _Sub = argparse._SubParsersAction["_Parser"]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.binary import check

    report = check.check_binary(Path(args.binary))
    if args.json:
        _print_json(report)
    else:
        print(check.format_report(report))
    return 0 if report["instrumented"] else 1


def _cmd_meson_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.build import meson_init

    result = meson_init.meson_init(Path(args.project_dir))
    print(meson_init.format_result(result))
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.build import scaffold

    created = scaffold.project(Path(args.dir), name=args.name)
    print(scaffold.format_result(created))
    return 0


def _selection(args: argparse.Namespace) -> Any:
    from fentry_build.fleet.targets import Selection

    return Selection(tuple(args.pid or ()), bool(args.all), args.program,
                     args.build_id.lower() if args.build_id else None)


def _timeout(args: argparse.Namespace, default: float = 10.0) -> float:
    return float(args.timeout or default)


def _cmd_apply(args: argparse.Namespace) -> int:
    from fentry_build.fleet import command

    return command.apply(_selection(args), args.patch, as_json=args.json,
                         dry_run=args.dry_run, timeout=_timeout(args, 60.0))


def _cmd_revert(args: argparse.Namespace) -> int:
    from fentry_build.fleet import command

    return command.revert(_selection(args), args.name, as_json=args.json, if_applied=args.if_applied,
                          dry_run=args.dry_run, timeout=_timeout(args))


def _cmd_unload(args: argparse.Namespace) -> int:
    from fentry_build.fleet import command

    return command.unload(_selection(args), args.name, as_json=args.json, timeout=_timeout(args))


def _cmd_list(args: argparse.Namespace) -> int:
    from fentry_build.fleet import command

    return command.list_patches(_selection(args), history=args.history, as_json=args.json,
                                timeout=_timeout(args))


def _cmd_status(args: argparse.Namespace) -> int:
    from fentry_build.fleet import command

    return command.status(_selection(args), as_json=args.json, timeout=_timeout(args))


def _cmd_ps(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.fleet import command

    return command.ps(program=args.program, build_id=args.build_id,
                      missing=Path(args.missing) if args.missing else None, as_json=args.json,
                      timeout=_timeout(args))


def _cmd_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.fleet import command

    return command.install(Path(args.patch), apply_now=args.apply, as_json=args.json,
                           dry_run=args.dry_run, timeout=_timeout(args, 60.0))


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from fentry_build.fleet import command

    return command.uninstall(args.name, build_id=args.build_id, revert_now=args.revert,
                             if_installed=args.if_installed, as_json=args.json,
                             dry_run=args.dry_run, timeout=_timeout(args))


def _cmd_demo(args: argparse.Namespace) -> int:
    from fentry_build import demo

    return demo.run_demo(keep=args.keep)


def _cmd_shim_path(args: argparse.Namespace) -> int:
    from fentry_build.build import sharedshim

    print(sharedshim.shim_path(rebuild=args.rebuild))
    return 0


def _cmd_attach(args: argparse.Namespace) -> int:
    from fentry_build.client import attach

    report = attach.attach(args.pid, tries=args.tries)
    print(json.dumps(report, sort_keys=True) if args.json else attach.format_attach(report))
    return 0


def _cmd_new_patch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.generator import newpatch

    result = newpatch.new_patch(args.name, args.function, Path(args.binary), Path(args.project),
                                file=args.file)
    print(newpatch.format_result(result))
    return 0


def _cmd_patch_from_diff(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.generator.fromdiff import command

    result = command.patch_from_diff(
        args.name, Path(args.binary), diff=Path(args.diff) if args.diff else None,
        fixed_tree=Path(args.fixed_tree) if args.fixed_tree else None, project=Path(args.project),
        build_dir=Path(args.build_dir) if args.build_dir else None)
    print(command.format_result(result))
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fentry_build.binary import store

    if args.list == bool(args.programs):
        raise FentryError("pass the programs to archive, or --list to show the archived ones")
    explicit = Path(args.store) if args.store else None
    if args.list:
        found = store.entries(store.store_dir(explicit))
        if args.json:
            _print_json([e.as_json() for e in found])
        else:
            print("\n".join(store.format_entry(e) for e in found) if found else "no archived builds")
        return 0
    results = []
    for program in map(Path, args.programs):
        entry, new = store.archive(program, store.store_dir(explicit, program),
                                   lambda m: print(f"fentry-build: warning: {m}", file=sys.stderr))
        results.append({**entry.as_json(), "new": new})
        if not args.json:
            what = "archived" if new else "already archived"
            print(f"{what} {entry.program} (build-id {entry.build_id}): {store.shown(entry.path)}")
    if args.json:
        _print_json(results)
    return 0


ARCHIVE_EXAMPLE = """\
examples:
  fentry-build archive build/server          # at release: keep the build that ships
  fentry-build archive /proc/1234/exe        # the build a process runs (even if deleted)
  fentry-build archive --list
  meson configure build -Dfentry:target=1f3a9c2e && meson compile -C build patches

The store is --store DIR, else $FENTRY_STORE, else .fentry/builds in the project's top
folder (of the binary's build, or of the working folder).  See docs/workflow.md.
"""


PATCH_FROM_DIFF_EXAMPLE = """\
example (the running server was built from v1.4.2; the fix is committed):
  git diff v1.4.2 > fix-cve.diff
  fentry-build patch-from-diff fix_cve --diff fix-cve.diff --binary build/server
  meson compile -C build patches
  fentry-build apply --pid 1234 build/fix_cve.so

The diff may be applied to the project already (it is then taken in reverse) or not
yet.  The units are recompiled with the lines of compile_commands.json (Meson writes
it; SCons with env.Tool('compilation_db')), so the binary's build folder must have one.
"""


def _timeout_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up after this long (default 10; apply: 60); a request the process "
                        "has not come to by then expires and is never carried out")


PS_EXAMPLE = """\
examples:
  fentry-build ps                                  # every patchable process you may see
  fentry-build ps --program /usr/sbin/server --json
  fentry-build ps --missing build/fix_parse.so     # is every process of that build patched?
"""

INSTALL_EXAMPLE = """\
examples:
  fentry-build install build/fix_parse.so          # processes started from now on load it
  fentry-build install --apply build/fix_parse.so  # ... and every running one gets it too
  fentry-build uninstall fix_parse --revert        # undo both
See docs/fleet.md.
"""

NEW_PATCH_EXAMPLE = """\
example:
  fentry-build new-patch fix_parse --function parse_request --binary build/server
  $EDITOR patches/fix_parse.c && meson compile -C build patches
"""


MULTI_EPILOG = """\
processes: --pid PID, repeated for several, or --all with --program PATH or --build-id ID
(apply, and revert or unload given the patch file: --all alone means every process
running the build the patch is for).  With more
than one process, each is handled on its own and reported on its own line (--json: one
JSON object per process per line, with "pid" and "ok"); the exit status is 0 when every
process succeeded, 3 when some did, 1 when none did or no process matched.
"""


def _processes_option(s: argparse.ArgumentParser, *, apply: bool = False) -> None:
    s.add_argument("--pid", type=int, action="append", metavar="PID",
                   help="a process (repeat for several)")
    s.add_argument("--all", action="store_true",
                   help="every process with the shim running --program or --build-id"
                   + (" (alone: the build the patch is for)" if apply else ""))
    s.add_argument("--program", metavar="PATH", help="with --all: the processes running this executable")
    s.add_argument("--build-id", metavar="ID", help="with --all: the processes running this build "
                   "(of the executable or of a library they load)")


def _dry_run_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--dry-run", action="store_true",
                   help="say what would change (\"changed\" in --json) and change nothing")


def _add_check(sub: _Sub) -> None:
    s = sub.add_parser("check", help="is a binary instrumented; its build-id and patchable functions")
    s.add_argument("binary")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_check)



def _add_meson_init(sub: _Sub) -> None:
    s = sub.add_parser("meson-init", help="put the fentry subproject into a Meson project")
    s.add_argument("project_dir", nargs="?", default=".")
    s.set_defaults(func=_cmd_meson_init)



def _add_init(sub: _Sub) -> None:
    s = sub.add_parser("init", help="scaffold a new live-patchable Meson project")
    s.add_argument("dir")
    s.add_argument("--name", help="program name (default: the folder's name)")
    s.set_defaults(func=_cmd_init)



def _add_apply(sub: _Sub) -> None:
    s = sub.add_parser("apply", help="load a patch .so into running processes",
                       epilog=MULTI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _processes_option(s, apply=True)
    s.add_argument("patch", help="the patch .so (its name is the file name without .so)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _dry_run_option(s)
    _timeout_option(s)
    s.set_defaults(func=_cmd_apply)



def _add_revert(sub: _Sub) -> None:
    s = sub.add_parser("revert", help="revert a patch of running processes by name",
                       epilog=MULTI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _processes_option(s)
    s.add_argument("name", help="the patch: its name (fix), file name (fix.so) or the path applied")
    s.add_argument("--if-applied", action="store_true",
                   help="a patch that is not applied is no error: nothing changes (for automation)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _dry_run_option(s)
    _timeout_option(s)
    s.set_defaults(func=_cmd_revert)



def _add_unload(sub: _Sub) -> None:
    s = sub.add_parser("unload", help="unload a patch's reverted or replaced versions once no "
                       "thread runs their code", epilog=MULTI_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _processes_option(s)
    s.add_argument("name", help="the patch: its name (fix), file name (fix.so) or the path applied")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _timeout_option(s)
    s.set_defaults(func=_cmd_unload)



def _add_list(sub: _Sub) -> None:
    s = sub.add_parser("list", help="the patches of running processes",
                       epilog=MULTI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _processes_option(s)
    s.add_argument("--history", action="store_true",
                   help="its audit trail instead: every apply, revert and unload since it started")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _timeout_option(s)
    s.set_defaults(func=_cmd_list)



def _add_status(sub: _Sub) -> None:
    s = sub.add_parser("status", help="pid, program, build-id and mode of running processes",
                       epilog=MULTI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _processes_option(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _timeout_option(s)
    s.set_defaults(func=_cmd_status)



def _add_ps(sub: _Sub) -> None:
    s = sub.add_parser("ps", help="every process with the fentry shim: build, mode, patches",
                       epilog=PS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--program", metavar="PATH", help="only the processes running this executable")
    s.add_argument("--build-id", metavar="ID", help="only the processes running this build "
                   "(of the executable or of a library they load)")
    s.add_argument("--missing", metavar="PATCH.so", help="only the processes of the build this "
                   "patch is for that do not have this version of it in effect (exit status 1 "
                   "when there is one)")
    s.add_argument("--json", action="store_true", help="one JSON object per process per line")
    _timeout_option(s)
    s.set_defaults(func=_cmd_ps)



def _add_install(sub: _Sub) -> None:
    s = sub.add_parser("install", help="put a patch into the patch directory new processes load "
                       "at start", description="Check PATCH.so and put it, atomically, into "
                       "<dir>/<build-id>/NAME.so, where <dir> is $FENTRY_PATCH_DIR, else "
                       "/var/lib/fentry for root, else $XDG_DATA_HOME/fentry "
                       "(~/.local/share/fentry).  Processes of that build started from then on "
                       "load it before main.", epilog=INSTALL_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("patch", help="the patch .so")
    s.add_argument("--apply", action="store_true",
                   help="also apply it to every running process of that build")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _dry_run_option(s)
    _timeout_option(s)
    s.set_defaults(func=_cmd_install)



def _add_uninstall(sub: _Sub) -> None:
    s = sub.add_parser("uninstall", help="remove a patch from the patch directory",
                       epilog=INSTALL_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("name", help="the patch's name (fix) or file name (fix.so)")
    s.add_argument("--build-id", metavar="ID", help="only from this build's folder (default: "
                   "from every build's)")
    s.add_argument("--revert", action="store_true",
                   help="also revert it in every running process of that build")
    s.add_argument("--if-installed", action="store_true",
                   help="a patch that is not installed is no error: nothing changes")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _dry_run_option(s)
    _timeout_option(s)
    s.set_defaults(func=_cmd_uninstall)



def _add_shim_path(sub: _Sub) -> None:
    s = sub.add_parser("shim-path", help="build (once) and print the shared shim, for LD_PRELOAD")
    s.add_argument("--rebuild", action="store_true", help="build it again even if cached")
    s.set_defaults(func=_cmd_shim_path)



def _add_attach(sub: _Sub) -> None:
    s = sub.add_parser("attach", help="load the shim into a running instrumented process")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--tries", type=int, default=60,
                   help="times to look for a moment safe to load the shim before giving up")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_attach)



def _add_new_patch(sub: _Sub) -> None:
    s = sub.add_parser("new-patch", help="write a patch skeleton for one function of a built program",
                       epilog=NEW_PATCH_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("name", help="the patch's name: writes patches/NAME.c, builds build/NAME.so")
    s.add_argument("--function", required=True, help="the function to replace")
    s.add_argument("--binary", required=True, help="the built program (with -g: the prototype "
                   "comes from its DWARF)")
    s.add_argument("--project", default=".", help="the project's top folder (default: .)")
    s.add_argument("--file", help="the function's source file, when several static functions "
                   "share its name")
    s.set_defaults(func=_cmd_new_patch)



def _add_patch_from_diff(sub: _Sub) -> None:
    s = sub.add_parser("patch-from-diff", help="write the live patch a source fix makes (from a diff)",
                       description="Write patches/NAME.c: the functions the fix changes, read from "
                       "the fixed sources, as a live patch of the running build; add it to the "
                       "project's patch list.",
                       epilog=PATCH_FROM_DIFF_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("name", help="the patch's name: writes patches/NAME.c, builds build/NAME.so")
    fix = s.add_mutually_exclusive_group(required=True)
    fix.add_argument("--diff", help="the fix as a unified diff (git diff), paths relative to the project")
    fix.add_argument("--fixed-tree", help="a folder holding the fixed sources")
    s.add_argument("--binary", required=True, help="the running build (or an archived copy), with -g")
    s.add_argument("--project", default=".", help="the project's top folder (default: .)")
    s.add_argument("--build-dir", help="the folder of compile_commands.json (default: beside the "
                   "binary or above it)")
    s.set_defaults(func=_cmd_patch_from_diff)



def _add_archive(sub: _Sub) -> None:
    s = sub.add_parser("archive", help="keep released builds by build-id, to build patches for them later",
                       description="Copy each PROGRAM (with its symbols and DWARF) into the store "
                       "under its build-id, or list the store.",
                       epilog=ARCHIVE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("programs", nargs="*", metavar="PROGRAM", help="a built program, or /proc/PID/exe")
    s.add_argument("--list", action="store_true", help="list the archived builds")
    s.add_argument("--store", help="the store folder (default: $FENTRY_STORE, else "
                   "<project>/.fentry/builds)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_archive)



def _add_demo(sub: _Sub) -> None:
    s = sub.add_parser("demo", help="build the server example, fix its bug live, revert it")
    s.add_argument("--keep", action="store_true", help="keep the temporary build directory")
    s.set_defaults(func=_cmd_demo)



_COMMANDS: dict[str, Callable[[_Sub], None]] = {
    "check": _add_check,
    "meson-init": _add_meson_init,
    "init": _add_init,
    "apply": _add_apply,
    "revert": _add_revert,
    "unload": _add_unload,
    "list": _add_list,
    "status": _add_status,
    "ps": _add_ps,
    "install": _add_install,
    "uninstall": _add_uninstall,
    "shim-path": _add_shim_path,
    "attach": _add_attach,
    "new-patch": _add_new_patch,
    "patch-from-diff": _add_patch_from_diff,
    "archive": _add_archive,
    "demo": _add_demo,
}


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it: $COLUMNS, else the
    terminal of standard output, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    stdout = sys.__stdout__
    if columns <= 0 and stdout is not None:
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its help formatted to the terminal's width as argparse does it -
    without argparse importing shutil for that width on every add_argument (with bz2, lzma
    and zlib: about 4 ms of every command's start on the 2-core test machine)."""

    def __init__(self, *, formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
                 **kwargs: Any) -> None:
        import functools

        # HelpFormatter's own default: the terminal's columns less 2.
        super().__init__(formatter_class=functools.partial(formatter_class, width=_columns() - 2),
                         **kwargs)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; given `command`, with only that command's subparser
    (what parsing a command line of it needs: every call would otherwise build all of them)."""
    p = _Parser(
        prog="fentry-build",
        description="Userspace live patching for C programs built with gcc -pg -mfentry.",
    )
    p.add_argument("--version", action="version", version=f"fentry-build {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in _COMMANDS.items():
        if command is None or name == command:
            add(sub)
    return p


def _command_of(argv: Sequence[str]) -> str | None:
    """The command a command line names, when its parser alone can parse it: the first
    word is a command (options of the top level such as --help come before it)."""
    return argv[0] if argv and argv[0] in _COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = _parser(_command_of(words)).parse_args(words)
    try:
        return int(args.func(args))
    except FentryError as e:
        print(f"fentry-build: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fentry-build: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error of ours.
        sys.stderr.close()
        return 0
