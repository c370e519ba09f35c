"""binary/program.py - one built program or shared library, opened once for everything read of it.

The generator, ``fentry-build check`` and ``fentry-build new-patch`` each take a Program:
its symbols, build-id and fentry sites are read when it is opened; its DWARF on first
use, from the same open file.  Nothing re-opens the binary.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from elftools.elf.elffile import ELFFile

from fentry_build.binary.dwarf import DWARF_ERRORS, ProgramDwarf
from fentry_build.binary.elf import ELF_ERRORS, BinaryInfo, read_elf, unreadable


class Program:
    """A built ELF file open for reading: ``with Program.open(path) as program: ...``."""

    def __init__(self, path: Path, stream: BinaryIO, elf: ELFFile, info: BinaryInfo) -> None:
        self.path = path
        self.info = info
        self._stream = stream
        self._elf = elf

    @classmethod
    def open(cls, path: Path) -> Program:
        """Open and read `path`; FentryError (one line) if it is not a readable program."""
        try:
            stream = open(path, "rb")
        except OSError as e:
            raise unreadable(path, e) from None
        try:
            elf = ELFFile(stream)
            return cls(path, stream, elf, read_elf(elf, path))
        except BaseException as e:
            stream.close()
            if isinstance(e, (OSError, *ELF_ERRORS)):
                raise unreadable(path, e) from None
            raise

    @cached_property
    def dwarf(self) -> ProgramDwarf | None:
        """The DWARF (-g) of the program, None without it or when it cannot be read."""
        try:
            return ProgramDwarf.of(self._elf)
        except DWARF_ERRORS:
            return None

    @property
    def name(self) -> str:
        """The program's file name (binary.elf.program_name: /proc/PID/exe says the real one)."""
        return self.info.name

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["Program"]
