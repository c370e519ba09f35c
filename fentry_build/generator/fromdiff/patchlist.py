"""patchlist.py - adds a patch to the project's list of patches, as new-patch does.

Meson: the `patches = {...}` dict of meson.build (new-patch's MesonPatches).  SCons: the
`patches={...}` dict passed to fentry_build.project() in the SConstruct (docs/scons.md),
edited the same way when it has that simple form; otherwise the entry is printed for the
user to add.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fentry_build.generator.main import write_atomically
from fentry_build.generator.newpatch import MesonPatches

# `patches={'a': 'patches/a.c', ...}` as docs/scons.md writes it (one line or several).
_SCONS_DICT = re.compile(r"\bpatches\s*=\s*\{(?P<body>[^{}]*)\}")
_ENTRY = re.compile(r"""(?P<q>['"])(?P<name>[^'"\\\n]*)(?P=q)\s*:\s*(?P<q2>['"])[^'"\\\n]*(?P=q2)""")


@dataclass(frozen=True)
class Registration:
    build_file: Path
    updated: bool
    entry: str


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
        if len(matches) != 1 or _ENTRY.sub("", matches[0].group("body")).replace(",", "").strip():
            return
        self._match = matches[0]
        self.names = [m.group("name") for m in _ENTRY.finditer(matches[0].group("body"))]

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


def names(project: Path) -> list[str]:
    """The patch names the project's build files list already."""
    return MesonPatches(project / "meson.build").names + SConsPatches(project / "SConstruct").names


def register(project: Path, name: str) -> Registration:
    """Add `'NAME': 'patches/NAME.c'` to the project's patch list (Meson first, then SCons)."""
    source = f"patches/{name}.c"
    entry = f"'{name}': '{source}'"
    meson = MesonPatches(project / "meson.build")
    if meson.found:
        write_atomically(meson.path, meson.with_entry(name, source))
        return Registration(meson.path, True, entry)
    scons = SConsPatches(project / "SConstruct")
    if scons.found:
        write_atomically(scons.path, scons.with_entry(name, source))
        return Registration(scons.path, True, entry)
    build_file = meson.path if meson.text is not None or scons.text is None else scons.path
    return Registration(build_file, False, entry)
