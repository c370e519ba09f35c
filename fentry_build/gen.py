"""``python -m fentry_build.gen``: the patch generator's command (users' meson.build files and
the SCons tool run it).  Kept here for that name; the generator is fentry_build.generator."""

from __future__ import annotations

from fentry_build.generator.main import generate, main

__all__ = ["generate", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
