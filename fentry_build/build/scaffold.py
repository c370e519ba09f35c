"""``fentry-build init DIR``: scaffold a new live-patchable Meson project from templates."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fentry_build.build import meson_init
from fentry_build import jinja
from fentry_build.errors import FentryError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class ScaffoldResult:
    project_dir: Path
    name: str
    files: list[Path]


def project(directory: Path | str, name: str | None = None) -> ScaffoldResult:
    """Create ``directory`` with a program, an example patch, meson.build and the subproject."""
    directory = Path(directory).resolve()
    name = name or directory.name
    if not _NAME.fullmatch(name):
        raise FentryError(f"{name!r} is not a usable program name (letters, digits, _); "
                          "pass --name NAME")
    if (directory / "meson.build").exists():
        raise FentryError(f"{directory} already has a meson.build; to add fentry to an existing "
                          "project run `fentry-build meson-init` there instead")
    patch = "fix_greeting"
    files = {
        directory / "meson.build": meson_init.meson_snippet(name, [f"{name}.c"],
                                                 {patch: f"patches/{patch}.c"}),
        directory / f"{name}.c": jinja.render("project/main.c.j2", {"name": name}),
        directory / "patches" / f"{patch}.c": jinja.render("project/patch.c.j2",
                                                            {"name": name, "patch": patch}),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    meson_init.meson_init(directory)
    return ScaffoldResult(directory, name, sorted(files))


def format_result(result: ScaffoldResult) -> str:
    d = result.project_dir
    return "\n".join([
        f"created {d} (program {result.name}, patch fix_greeting)",
        "",
        f"  cd {d}",
        "  meson setup build && meson compile -C build",
        f"  build/{result.name} &                          # prints its pid",
        "  meson compile -C build patches",
        "  fentry-build apply --pid PID build/fix_greeting.so",
    ])
