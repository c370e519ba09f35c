"""trees.py - the original and the fixed source trees of a project.

With --fixed-tree the user names both.  With --diff one of them is the project folder
and the other a temporary copy of it with the diff applied by `git apply` (no git
repository needed): forward when the project is still the original, in reverse when the
fix is already applied to it (`git diff v1.4.2 > fix.diff` in the fixed working tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fentry_build.errors import FentryError

NEVER_COPIED = frozenset({".git", ".hg", ".svn"})


@dataclass(frozen=True)
class SourceTrees:
    """The project folder and the two versions of its sources."""

    project: Path     # the folder of patches/ and the build file; compile lines name it
    original: Path    # the sources of the running build
    fixed: Path       # the sources with the fix
    fixed_on_disk: bool  # the fixed tree stays after the run (the project, or --fixed-tree)
    how: str          # for the patch's header comment: "diff fix.diff", "fixed tree ../x"

    def same_file(self, relative: Path) -> bool:
        """Has `relative` (a path inside the project) the same bytes in both trees?"""
        a, b = self.original / relative, self.fixed / relative
        if not a.is_file() or not b.is_file():
            return a.is_file() == b.is_file()
        return a.read_bytes() == b.read_bytes()


def _ignore(project: Path, excluded: Iterable[Path]) -> Callable[[str, list[str]], set[str]]:
    skip = {p.resolve() for p in excluded}

    def ignore(folder: str, names: list[str]) -> set[str]:
        base = Path(folder).resolve()
        return {n for n in names if n in NEVER_COPIED or (base / n) in skip}

    return ignore


def copy_tree(project: Path, dest: Path, excluded: Iterable[Path]) -> Path:
    """A copy of the project's sources (no build folders, no VCS data) at `dest`."""
    shutil.copytree(project, dest, symlinks=True, ignore=_ignore(project, excluded))
    return dest


def _git_apply(folder: Path, diff: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The copy is not a repository; never let git find one in a folder above it.
    env["GIT_CEILING_DIRECTORIES"] = str(folder.parent)
    return subprocess.run(["git", "apply", *options, str(diff)], cwd=folder, env=env,
                          capture_output=True, text=True, errors="replace", timeout=300)


def _first_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[0] if lines else f"exit {proc.returncode}"


def from_diff(project: Path, diff: Path, workdir: Path, excluded: Iterable[Path]) -> SourceTrees:
    """The trees of `project` and `diff`: the project is one side, a patched copy the other."""
    if shutil.which("git") is None:
        raise FentryError("applying a diff needs git (git apply); install git, or pass "
                          "--fixed-tree with the fixed sources instead of --diff")
    if not diff.is_file():
        raise FentryError(f"{diff}: no such diff file; write one with git diff > FILE")
    diff = diff.resolve()
    copy = copy_tree(project, workdir / "tree", excluded)
    forward = _git_apply(copy, diff, "--check")
    if forward.returncode == 0:
        done = _git_apply(copy, diff)
        if done.returncode != 0:
            raise FentryError(f"git apply {diff.name} failed in a copy of {project}: {_first_line(done)}")
        return SourceTrees(project, project, copy, False, f"the diff {diff.name}")
    backward = _git_apply(copy, diff, "--check", "--reverse")
    if backward.returncode == 0:
        done = _git_apply(copy, diff, "--reverse")
        if done.returncode != 0:
            raise FentryError(f"git apply --reverse {diff.name} failed in a copy of {project}: "
                              f"{_first_line(done)}")
        return SourceTrees(project, copy, project, True, f"the diff {diff.name}")
    raise FentryError(
        f"{diff.name} applies to {project} neither forward (the running build's sources) nor in "
        f"reverse (the fixed sources): {_first_line(forward)}; write the diff with paths relative "
        "to the project folder (git diff from its top), against the sources of the running build")


def from_fixed_tree(project: Path, fixed: Path) -> SourceTrees:
    if not fixed.is_dir():
        raise FentryError(f"{fixed}: no such folder; pass --fixed-tree the folder of the fixed sources")
    fixed = fixed.resolve()
    if fixed == project:
        raise FentryError(f"--fixed-tree {fixed} is the project folder itself; pass the fixed copy")
    return SourceTrees(project, project, fixed, True, f"the fixed tree {fixed}")
