"""fentry_build: userspace live patching for C programs, driven from the build system."""

from __future__ import annotations

__version__ = "0.1.0"
