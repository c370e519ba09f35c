"""The jinja2 environment over the package's ``templates/`` folder."""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from fentry_build import paths


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, context: dict[str, Any]) -> str:
    return environment().get_template(template).render(**context)
