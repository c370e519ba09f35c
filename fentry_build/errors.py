"""The one exception the package raises for problems a user must fix."""

from __future__ import annotations


class FentryError(Exception):
    """A user-facing failure: its message is one line that names the thing and the fix.

    The CLI prints it as ``fentry-build: error: <message>`` and exits non-zero; library
    callers (tests, the SCons tool, Meson's generator step) can catch it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
