"""binary/patchinfo.py - what a built patch .so says about itself, read without loading it.

The fleet commands (``ps --missing``, ``apply --all``, ``install``) need a patch's name, the
build it is for and its version before any process sees it: the build-id and the ABI version
come from its descriptor (the ``fentry_patch`` dynamic symbol, ``struct fentry_patch`` in
shim/include/fentry.h), read with pyelftools at the symbol's file offset; the version is the
SHA-256 of the file's bytes, the same digest the shim computes of its private copy.  Only the
descriptor's plain members are read (never its pointers, which relocations fill in).
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from fentry_build.errors import FentryError

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

PATCH_SYMBOL = "fentry_patch"  # FENTRY_PATCH_SYMBOL in fentry.h
ABI_VERSION = 1                # FENTRY_ABI_VERSION in fentry.h
BUILD_ID_MAX = 64              # FENTRY_BUILD_ID_MAX in fentry.h

# Offsets of the plain members of struct fentry_patch on x86-64 (tests/test_facts.py
# compiles offsetof() of each against fentry.h and fails when they drift).
OFFSET_ABI_VERSION = 0
OFFSET_NFUNCS = 4
OFFSET_BUILD_ID_LEN = 16
OFFSET_BUILD_ID = 20
DESCRIPTOR_HEAD = OFFSET_BUILD_ID + BUILD_ID_MAX

#: Bytes of a patch file we are prepared to read (a patch is a small shared object).
PATCH_MAX = 256 * 1024 * 1024


@dataclass(frozen=True)
class PatchInfo:
    """A patch file as the fleet commands see it."""

    path: Path
    name: str        # the file name without .so: the name the shim gives the patch
    build_id: str    # hex, of the program (or library) the patch was built for
    functions: int   # how many functions it replaces
    sha256: str      # hex digest of the file's bytes: the patch's version

    @property
    def file_name(self) -> str:
        return self.name + ".so"


def patch_name(path: Path) -> str:
    """The name the shim gives a patch loaded from `path`: its file name without ``.so``."""
    name = path.name
    return name[:-3] if name.endswith(".so") else name


def _descriptor(elf: ELFFile, path: Path) -> bytes:
    from elftools.elf.sections import SymbolTableSection

    dynsym = elf.get_section_by_name(".dynsym")
    sym = None
    if isinstance(dynsym, SymbolTableSection):
        found = dynsym.get_symbol_by_name(PATCH_SYMBOL)
        sym = next((s for s in found or [] if s["st_shndx"] != "SHN_UNDEF"), None)
    if sym is None:
        raise FentryError(f"{path} is not a fentry patch: it defines no {PATCH_SYMBOL} descriptor; "
                          "build it with the generator's registration (meson compile patches)")
    if int(sym["st_size"]) < DESCRIPTOR_HEAD:
        raise FentryError(f"{path}: its {PATCH_SYMBOL} descriptor is {sym['st_size']} bytes, too "
                          "small for struct fentry_patch; rebuild the patch")
    offsets = list(elf.address_offsets(int(sym["st_value"]), DESCRIPTOR_HEAD))
    if not offsets:
        raise FentryError(f"{path}: its {PATCH_SYMBOL} descriptor lies outside the file's "
                          "segments; rebuild the patch")
    elf.stream.seek(offsets[0])
    head: bytes = elf.stream.read(DESCRIPTOR_HEAD)
    if len(head) != DESCRIPTOR_HEAD:
        raise FentryError(f"{path} is truncated (its descriptor is cut short); rebuild the patch")
    return head


def read_patch_bytes(data: bytes, path: Path) -> PatchInfo:
    """The PatchInfo of a patch whose file holds `data` (read once: what is checked is what
    is hashed and installed).  pyelftools is imported here: naming a patch (patch_name)
    must not cost the import, nor need it (the client of one process runs without it)."""
    from elftools.elf.elffile import ELFFile

    from fentry_build.binary.elf import ELF_ERRORS

    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64" or elf["e_type"] != "ET_DYN":
            raise FentryError(f"{path} is not an x86-64 shared object ({elf['e_machine']}, "
                              f"{elf['e_type']}); a patch is the .so the patches target builds")
        head = _descriptor(elf, path)
    except ELF_ERRORS as e:
        raise FentryError(f"{path} is not a readable ELF shared object ({e}); pass a built "
                          "patch .so") from None
    abi, nfuncs = struct.unpack_from("<II", head, OFFSET_ABI_VERSION)
    if abi != ABI_VERSION:
        raise FentryError(f"{path} was built for descriptor ABI version {abi}; this fentry_build "
                          f"speaks version {ABI_VERSION}: rebuild the patch with it")
    (id_len,) = struct.unpack_from("<I", head, OFFSET_BUILD_ID_LEN)
    if not 0 < id_len <= BUILD_ID_MAX:
        raise FentryError(f"{path}: its descriptor holds no valid build-id (length {id_len}); "
                          "rebuild the patch")
    build_id = head[OFFSET_BUILD_ID:OFFSET_BUILD_ID + id_len].hex()
    return PatchInfo(path, patch_name(path), build_id, int(nfuncs), hashlib.sha256(data).hexdigest())


def read_patch_file(path: Path) -> tuple[PatchInfo, bytes]:
    """A patch file's PatchInfo and its bytes; one-line FentryError when it is not a patch."""
    try:
        with open(path, "rb") as f:
            data = f.read(PATCH_MAX + 1)
    except FileNotFoundError:
        raise FentryError(f"patch {path} does not exist; build it first (meson compile patches)") from None
    except IsADirectoryError:
        raise FentryError(f"patch {path} is a folder, not a patch .so") from None
    except OSError as e:
        raise FentryError(f"cannot read patch {path}: {e.strerror or e}") from None
    if len(data) > PATCH_MAX:
        raise FentryError(f"patch {path} is larger than {PATCH_MAX} bytes: not a patch")
    return read_patch_bytes(data, path), data


def read_patch(path: Path) -> PatchInfo:
    """The PatchInfo of the patch file `path`."""
    return read_patch_file(path)[0]


__all__ = ["ABI_VERSION", "PATCH_SYMBOL", "PatchInfo", "patch_name", "read_patch", "read_patch_bytes",
           "read_patch_file"]
