"""Patch sources scanned as the generator scans them: compiled by gcc with fentry.h (generator/scan.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fentry_build.generator.patchsrc import PatchSource, patch_source
from fentry_build.generator.scan import PatchCompile, scan


def scan_text(text: str, *flags: str, name: str = "fix.c") -> PatchSource:
    """The FENTRY_* uses of a patch source `text` (fentry.h included first, as a patch
    includes it; `flags` added to the compile line), messages naming it `name`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / name).write_text(text)
        compile = PatchCompile("gcc", ("-include", "fentry.h", *flags), folder, name, "a test")
        records = scan(Path(name), compile, folder).records
        return patch_source(Path(name), records, folder / name)
