"""build/patchlist.py - a project's list of patches in its build file, and the commands that build them.

new-patch and patch-from-diff add the patch they write to the list: the `patches = {...}`
dict of meson.build (the README snippet's form), or the `patches={...}` dict passed to
fentry_build.project() in an SConstruct (docs/scons.md's form) - edited only when it has
that simple form, otherwise the entry is printed for the user to add.  Which build system
builds the program is told by its folder: Meson's build folders hold meson-info/.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fentry_build.atomic import write_atomically
from fentry_build.errors import FentryError
from fentry_build.layout import meson_build_dir, shown

# ---- Meson: meson.build ------------------------------------------------------------------------------

# The snippet's dict (README, templates/project/meson.build.j2): `patches = {` then
# 'name': 'source' entries, one a line or all on one line, then `}`.
_PATCHES_DICT = re.compile(r"^(?P<indent>[ \t]*)patches\s*=\s*\{(?P<body>[^{}]*)\}", re.M)
_ENTRY = re.compile(r"'(?P<name>[^'\\\n]*)'\s*:\s*'(?P<src>[^'\\\n]*)'")


class MesonPatches:
    """The `patches = {...}` dict of a project's meson.build, when it has the snippet's form."""

    def __init__(self, meson_build: Path) -> None:
        self.path = meson_build
        self.text = meson_build.read_text(encoding="utf-8") if meson_build.is_file() else None
        self._match = None
        self.names: list[str] = []
        if self.text is None:
            return
        matches = list(_PATCHES_DICT.finditer(self.text))
        if len(matches) != 1:
            return
        body = matches[0].group("body")
        if _ENTRY.sub("", body).replace(",", "").strip():
            return  # something else in the dict (variables, comments): leave it to the user
        self._match = matches[0]
        self.names = [m.group("name") for m in _ENTRY.finditer(body)]

    @property
    def found(self) -> bool:
        return self._match is not None

    def with_entry(self, name: str, source: str) -> str:
        """The meson.build text with `'name': 'source'` added to the dict."""
        assert self._match is not None and self.text is not None
        m = self._match
        body = m.group("body")
        entry = f"'{name}': '{source}'"
        if "\n" not in body:  # all on one line: {'a': 'a.c'} or {}
            items = body.strip().rstrip(",").strip()
            new_body = f"{items}, {entry}" if items else entry
        else:
            entries = list(_ENTRY.finditer(body))
            indent = m.group("indent") + "  "
            if entries:  # as the last entry, when it starts its own line
                line_start = body.rfind("\n", 0, entries[-1].start()) + 1
                prefix = body[line_start:entries[-1].start()]
                if line_start > 0 and not prefix.strip():
                    indent = prefix
            head = body.rstrip()
            if entries and not head.endswith(","):
                head += ","
            new_body = f"{head}\n{indent}{entry},\n{m.group('indent')}"
        start, end = m.start("body"), m.end("body")
        return self.text[:start] + new_body + self.text[end:]


# ---- SCons: the SConstruct ---------------------------------------------------------------------

# `patches={'a': 'patches/a.c', ...}` as docs/scons.md writes it (one line or several).
_SCONS_DICT = re.compile(r"\bpatches\s*=\s*\{(?P<body>[^{}]*)\}")
_SCONS_ENTRY = re.compile(r"""(?P<q>['"])(?P<name>[^'"\\\n]*)(?P=q)\s*:\s*(?P<q2>['"])[^'"\\\n]*(?P=q2)""")


class SConsPatches:
    """The patches={...} dict of a project's SConstruct, when it has the documented form."""

    def __init__(self, sconstruct: Path) -> None:
        self.path = sconstruct
        self.text = sconstruct.read_text(encoding="utf-8") if sconstruct.is_file() else None
        self._match: re.Match[str] | None = None
        self.names: list[str] = []
        if self.text is None:
            return
        matches = list(_SCONS_DICT.finditer(self.text))
        if len(matches) != 1 or _SCONS_ENTRY.sub("", matches[0].group("body")).replace(",", "").strip():
            return
        self._match = matches[0]
        self.names = [m.group("name") for m in _SCONS_ENTRY.finditer(matches[0].group("body"))]

    @property
    def found(self) -> bool:
        return self._match is not None

    def with_entry(self, name: str, source: str) -> str:
        assert self._match is not None and self.text is not None
        body = self._match.group("body")
        items = body.rstrip().rstrip(",")
        entry = f"'{name}': '{source}'"
        if "\n" in body:
            indent = re.search(r"\n([ \t]*)\S", body)
            new_body = f"{items},\n{indent.group(1) if indent else '    '}{entry},\n"
        else:
            new_body = f"{items}, {entry}" if items.strip() else entry
        start, end = self._match.start("body"), self._match.end("body")
        return self.text[:start] + new_body + self.text[end:]



# ---- which one, and its commands -----------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """Where the patch NAME was (or must be) listed, and the commands that build and apply it."""

    system: str            # "meson", "scons" or "" (neither build file found)
    build_file: Path
    updated: bool          # the entry was added to build_file
    entry: str             # 'NAME': 'patches/NAME.c'
    commands: list[str] = field(default_factory=list)

    def entry_lines(self) -> list[str]:
        """The entry added to the build file, or the entry to add and where."""
        where = ("the patches={...} of fentry_build.project() in" if self.system == "scons"
                 else "the patches dict of")
        if self.updated:
            return [f"added {self.entry} to {where} {self.build_file}"]
        hint = "docs/scons.md" if self.system == "scons" else "`fentry-build meson-init`"
        return [f"add this entry to {where} {self.build_file} (see {hint}):", f"  {self.entry},"]


def build_system(project: Path, binary: Path) -> str:
    """"meson" or "scons": which builds `binary` (a project may have both build files)."""
    has_meson = (project / "meson.build").is_file()
    has_scons = (project / "SConstruct").is_file()
    if has_meson and (not has_scons or meson_build_dir(binary) is not None):
        return "meson"
    return "scons" if has_scons else ""


def commands(system: str, binary: Path, name: str) -> list[str]:
    """The commands that build the patch NAME for `binary` and apply it (beside the program)."""
    so = shown(Path(os.path.abspath(binary)).parent / f"{name}.so")
    apply = f"fentry-build apply --pid PID {so}"
    if system == "meson":
        build_dir = meson_build_dir(binary)
        return [f"meson compile -C {shown(build_dir) if build_dir else 'build'} patches", apply]
    if system == "scons":
        return ["scons patches", apply]
    return [f"python -m fentry_build.gen --binary {shown(binary)} --patch patches/{name}.c "
            f"-o {name}_reg.c -- gcc CFLAGS   # CFLAGS: the patch's -I/-D; then link "
            f"patches/{name}.c and {name}_reg.c into {name}.so", apply]


def names(project: Path) -> list[str]:
    """The patch names the project's build files list already."""
    return MesonPatches(project / "meson.build").names + SConsPatches(project / "SConstruct").names


def check_new_name(project: Path, name: str) -> None:
    """FentryError when the project's build files list a patch called `name` already."""
    for listed in (MesonPatches(project / "meson.build"), SConsPatches(project / "SConstruct")):
        if name in listed.names:
            raise FentryError(f"{listed.path} already has a patch named '{name}' in its patches "
                              "dict; pick another name")


def register(project: Path, name: str, binary: Path) -> Registration:
    """Add `'NAME': 'patches/NAME.c'` to the patch list of the build system that builds `binary`."""
    source = f"patches/{name}.c"
    entry = f"'{name}': '{source}'"
    system = build_system(project, binary)
    todo = commands(system, binary, name)
    if system == "scons":
        scons = SConsPatches(project / "SConstruct")
        if scons.found:
            write_atomically(scons.path, scons.with_entry(name, source))
        return Registration("scons", scons.path, scons.found, entry, todo)
    meson = MesonPatches(project / "meson.build")
    if meson.found:
        write_atomically(meson.path, meson.with_entry(name, source))
    return Registration(system, meson.path, meson.found, entry, todo)


__all__ = ["MesonPatches", "Registration", "SConsPatches", "build_system", "check_new_name",
           "commands", "names", "register"]
