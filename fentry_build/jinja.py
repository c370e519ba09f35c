"""jinja.py - the package's one jinja2 environment, over its ``templates/`` folder.

Every template - the registration and skeleton C sources of the generator, the Meson
files and project scaffolding of build/ - renders through environment(): strict about
undefined names, trailing newline kept, block tags trimmed (trim_blocks, lstrip_blocks),
and the filters the C templates need to spell values safely.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from fentry_build import paths


def c_string(value: str | None) -> str:
    """A C string literal for `value` (NULL for None); octal escapes for everything unusual."""
    if value is None:
        return "NULL"
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch in "\\\"":
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F and ch != "?":  # '?' avoids trigraphs
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_bytes(data: bytes) -> str:
    return ", ".join(f"0x{b:02x}" for b in data)


def c_comment(value: str) -> str:
    """Text safe inside a /* */ comment: no comment end, no newline."""
    return value.replace("*/", "*\\/").replace("/*", "/\\*").replace("\n", " ").replace("\r", " ")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(c_string=c_string, c_bytes=c_bytes, c_comment=c_comment)
    return env


def render(template: str, context: dict[str, Any]) -> str:
    return environment().get_template(template).render(**context)


__all__ = ["c_bytes", "c_comment", "c_string", "environment", "render"]
