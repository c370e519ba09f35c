"""binary/elf.py - what fentry_build reads from a built ELF: build-id, functions and their fentry sites, data symbols."""

from __future__ import annotations

import bisect
import enum
import os
import posixpath
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import DWARFError, ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import NoteSection, Symbol, SymbolTableSection

from fentry_build.errors import FentryError

# What pyelftools raises on malformed debug info: DWARF is optional, so none is fatal.
# NotImplementedError: what it says of a form it does not read (e.g. segmented
# .debug_aranges, a segment selector size other than 0 - found by tests/test_fuzz.py).
DWARF_ERRORS = (DWARFError, ELFError, ConstructError, KeyError, ValueError, IndexError,
                AttributeError, AssertionError, TypeError, NotImplementedError)

FENTRY_SYMBOL = "__fentry__"

# The bytes a function entry may hold (docs/measurements.md, "Call-site forms").
ENDBR64 = b"\xf3\x0f\x1e\xfa"  # endbr64 (-fcf-protection): the site follows it
CALL_REL32_OPCODE = b"\xe8"  # call rel32
ADDR32_CALL_OPCODE = b"\x67\xe8"  # addr32 call rel32 (the linker's relaxed GOT call)
CALL_GOT_OPCODE = b"\xff\x15"  # call *rel32(%rip)
PREPARED_6_BYTES = b"\x67\xa9\xfd"  # addr32 test $imm32,%eax, imm32's low byte fd (sites.h)
PREPARED_5_BYTES = b"\xa9\xfe"  # test $imm32,%eax, imm32's low byte fe
PLT_JMP_OPCODE = b"\xff\x25"  # jmp *rel32(%rip): the first real instruction of a PLT entry
BND_PREFIX = b"\xf2"  # bnd jmp in MPX-era .plt.sec entries
PLT_SECTIONS = frozenset({".plt", ".plt.sec", ".plt.got"})

# Relocations that make a GOT slot hold the address of a named symbol.
SYMBOL_SLOT_RELOCS = frozenset(
    {ENUM_RELOC_TYPE_x64["R_X86_64_GLOB_DAT"], ENUM_RELOC_TYPE_x64["R_X86_64_JUMP_SLOT"],
     ENUM_RELOC_TYPE_x64["R_X86_64_64"]}
)
RELATIVE_RELOC = ENUM_RELOC_TYPE_x64["R_X86_64_RELATIVE"]

# Suffixes GCC gives the copies it makes of a function (IPA clones, split parts).
CLONE_SUFFIX_WORDS = frozenset(
    {"constprop", "isra", "part", "cold", "lto_priv", "localalias", "clone", "specialized"}
)

# Start-up code of the toolchain: never instrumented, not worth counting.
TOOLCHAIN_FUNCTIONS = frozenset(
    {"_start", "_init", "_fini", "_dl_relocate_static_pie", "__libc_csu_init", "__libc_csu_fini"}
)
TOOLCHAIN_FILES = frozenset({"crtstuff.c"})

_ADDR_MASK = (1 << 64) - 1


def _rel32(code: bytes, at: int) -> int:
    """The signed 32-bit displacement at `at` (little-endian)."""
    return int(struct.unpack_from("<i", code, at)[0])


class SiteForm(enum.Enum):
    """The form of the call to __fentry__ (enum fentry_site_form in fentry.h)."""

    CALL_REL32 = "e8"
    ADDR32_CALL = "67 e8"
    CALL_GOT = "ff 15"
    # Prepared at build time (build/prepare.py): the unpatched form of the two direct calls,
    # a test whose imm32 keeps the call's rel32 but for its low byte (fd / fe).
    PREPARED_6 = "67 a9"
    PREPARED_5 = "a9"

    @property
    def c_name(self) -> str:
        """The enumerator in fentry.h, e.g. FENTRY_SITE_CALL_GOT."""
        return "FENTRY_SITE_" + self.name

    @property
    def length(self) -> int:
        return 5 if self in (SiteForm.CALL_REL32, SiteForm.PREPARED_5) else 6

    @property
    def prepared(self) -> bool:
        return self in (SiteForm.PREPARED_6, SiteForm.PREPARED_5)


#: The operand byte every jump-mode form of a site keeps, by site length: the rel8 of its spin
#: (`eb fd` / `eb fe`, a jump to the site's own first byte), and the low byte of its patched
#: `jmp rel32` (shim/arch/x86_64/sites.h: SITE_REL8_6, SITE_REL8_5).
SPIN_REL8 = {6: 0xFD, 5: 0xFE}
#: A patched site's jump reaches only addresses of one residue modulo this (its low byte is fixed).
JUMP_ROW = 256


@dataclass(frozen=True)
class FentrySite:
    """The call to __fentry__ at a function's entry."""

    form: SiteForm
    offset: int  # 0, or 4 after endbr64
    entry: bytes  # the function's bytes from its first byte to the end of the site

    @property
    def length(self) -> int:
        return self.form.length

    def jump_residue(self, function_addr: int) -> int:
        """The residue modulo JUMP_ROW of every address this site's patched jump can reach,
        for the function at `function_addr` (a load base, page-aligned, keeps it)."""
        end = function_addr + self.offset + self.length
        return (end + SPIN_REL8[self.length]) % JUMP_ROW


@dataclass(frozen=True)
class CloneName:
    """A symbol name split into the function GCC copied and the suffix of the copy."""

    base: str
    suffix: str  # "" for the function itself, e.g. "constprop.0" for a clone

    @property
    def is_clone(self) -> bool:
        return self.suffix != ""

    @property
    def is_cold_part(self) -> bool:
        return "cold" in self.suffix.split(".")

    @property
    def is_alias(self) -> bool:
        """`f.localalias` is the same code as f under a local name, not a copy."""
        return "localalias" in self.suffix.split(".")

    @staticmethod
    def parse(name: str) -> CloneName:
        base, dot, rest = name.partition(".")
        if not dot or not base:
            return CloneName(name, "")
        words = rest.split(".")
        if all(w in CLONE_SUFFIX_WORDS or w.isdigit() for w in words) and words[0] in CLONE_SUFFIX_WORDS:
            return CloneName(base, rest)
        return CloneName(name, "")


@dataclass(frozen=True)
class FunctionInfo:
    """One function symbol of the binary and its fentry site, if it has one."""

    name: str
    addr: int  # link-time address (st_value)
    size: int
    local: bool  # STB_LOCAL: a static function
    file: str | None  # STT_FILE for static functions; DWARF compile unit for others
    site: FentrySite | None

    @property
    def clone(self) -> CloneName:
        return CloneName.parse(self.name)

    @property
    def is_toolchain(self) -> bool:
        return self.name in TOOLCHAIN_FUNCTIONS or self.file in TOOLCHAIN_FILES


@dataclass(frozen=True)
class DataSymbol:
    """One defined variable of the binary (STT_OBJECT, or STT_TLS for a thread-local one)."""

    name: str
    addr: int  # link-time address (st_value); for a thread-local one, its offset in the TLS block
    size: int
    local: bool  # STB_LOCAL: a static variable (a function's static local is `name.N`)
    file: str | None  # STT_FILE for static variables; None for globals
    tls: bool


@dataclass(frozen=True)
class BinaryInfo:
    """What the generator and `check` need of one built program or shared library."""

    path: Path
    build_id: bytes | None
    has_symtab: bool  # False when stripped: only .dynsym (exported functions) was read
    functions: tuple[FunctionInfo, ...]
    variables: tuple[DataSymbol, ...] = ()
    has_dwarf: bool = False  # a .debug_info section is present (built with -g)

    @property
    def name(self) -> str:
        """The program's file name, for messages and the descriptor (program_name)."""
        return program_name(self.path)

    @property
    def build_id_hex(self) -> str | None:
        return self.build_id.hex() if self.build_id is not None else None


@dataclass(frozen=True)
class Relocation:
    type: int
    symbol: str  # "" when the relocation names no symbol (R_X86_64_RELATIVE)
    addend: int


def _file_size(elf: ELFFile) -> int:
    stream = elf.stream
    here = stream.tell()
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(here)
    return size


class MemoryImage:
    """The bytes of the allocated sections, looked up by link-time address."""

    def __init__(self, elf: ELFFile) -> None:
        spans = []
        size = _file_size(elf)
        for sec in elf.iter_sections():
            if sec["sh_flags"] & 0x2 and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"]:
                # A corrupt header can promise more bytes than the file has (pyelftools
                # would then try to read them all): that is not a readable program.
                if sec["sh_offset"] + sec["sh_size"] > size:
                    raise ValueError(f"section {sec.name} runs past the end of the file")
                spans.append((sec["sh_addr"], sec.name, sec.data()))
        spans.sort(key=lambda s: s[0])
        self._starts = [s[0] for s in spans]
        self._spans = spans

    def _span_at(self, addr: int) -> tuple[int, str, bytes] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start, name, data = self._spans[i]
        return self._spans[i] if addr < start + len(data) else None

    def read(self, addr: int, size: int) -> bytes:
        """Up to `size` bytes at `addr` (fewer at the end of a section, none outside one)."""
        span = self._span_at(addr)
        if span is None:
            return b""
        start, _, data = span
        return data[addr - start : addr - start + size]

    def section_name(self, addr: int) -> str | None:
        span = self._span_at(addr)
        return span[1] if span is not None else None


class DynamicRelocations:
    """The relocations the dynamic loader applies (.rela.dyn, .rela.plt), by target address."""

    def __init__(self, elf: ELFFile) -> None:
        self._by_offset: dict[int, Relocation] = {}
        for sec in elf.iter_sections():
            if isinstance(sec, RelocationSection) and sec["sh_flags"] & 0x2:
                self._read_section(elf, sec)

    def _read_section(self, elf: ELFFile, sec: RelocationSection) -> None:
        symtab = elf.get_section(sec["sh_link"]) if sec["sh_link"] else None
        for rel in sec.iter_relocations():
            sym_index = rel["r_info_sym"]
            name = ""
            if sym_index and isinstance(symtab, SymbolTableSection):
                name = symtab.get_symbol(sym_index).name
            addend = rel["r_addend"] if sec.is_RELA() else 0
            self._by_offset[rel["r_offset"]] = Relocation(rel["r_info_type"], name, addend)

    def at(self, offset: int) -> Relocation | None:
        return self._by_offset.get(offset)


class FentryTarget:
    """Decides whether an address is __fentry__: the function itself, its PLT entry or GOT slot."""

    def __init__(self, defined: frozenset[int], image: MemoryImage, relocs: DynamicRelocations) -> None:
        self._defined = defined  # addresses of __fentry__ when the binary defines it
        self._image = image
        self._relocs = relocs

    def is_got_slot(self, slot: int) -> bool:
        """Does the 8-byte slot at `slot` hold __fentry__'s address once the binary is loaded?"""
        rel = self._relocs.at(slot)
        if rel is not None:
            if rel.type in SYMBOL_SLOT_RELOCS:
                return rel.symbol == FENTRY_SYMBOL
            return rel.type == RELATIVE_RELOC and rel.addend in self._defined
        value = self._image.read(slot, 8)  # non-PIE: the linker wrote the address itself
        return len(value) == 8 and struct.unpack("<Q", value)[0] in self._defined

    def is_prepared_call(self, site_end: int, upper: bytes) -> bool:
        """Was a prepared site (its rel32's upper three bytes kept) a direct call of the
        binary's own __fentry__?"""
        return any(struct.pack("<i", f - site_end)[1:] == upper
                   for f in self._defined if -(1 << 31) <= f - site_end < (1 << 31))

    def is_call_target(self, target: int) -> bool:
        """Is a direct call to `target` a call of __fentry__ (itself or its PLT entry)?"""
        if target in self._defined:
            return True
        if self._image.section_name(target) not in PLT_SECTIONS:
            return False
        slot = self._plt_slot(target)
        return slot is not None and self.is_got_slot(slot)

    def _plt_slot(self, entry: int) -> int | None:
        """The GOT slot a PLT entry jumps through: [endbr64] [bnd] jmp *rel32(%rip)."""
        code = self._image.read(entry, 16)
        pos = len(ENDBR64) if code.startswith(ENDBR64) else 0
        if code[pos : pos + 1] == BND_PREFIX:
            pos += 1
        if code[pos : pos + 2] != PLT_JMP_OPCODE or len(code) < pos + 6:
            return None
        return (entry + pos + 6 + _rel32(code, pos + 2)) & _ADDR_MASK


class EntrySiteDecoder:
    """Reads the bytes at a function's entry and recognises a verified call to __fentry__."""

    def __init__(self, image: MemoryImage, target: FentryTarget) -> None:
        self._image = image
        self._target = target

    def decode(self, addr: int, size: int) -> FentrySite | None:
        code = self._image.read(addr, min(size, len(ENDBR64) + 6))
        offset = len(ENDBR64) if code.startswith(ENDBR64) else 0
        form = self._form_at(code, offset)
        if form is None or offset + form.length > len(code):
            return None
        end = offset + form.length
        if form.prepared:
            ok = self._target.is_prepared_call(addr + end, code[end - 3 : end])
        else:
            pointee = (addr + end + _rel32(code, end - 4)) & _ADDR_MASK
            if form is SiteForm.CALL_GOT:
                ok = self._target.is_got_slot(pointee)
            else:
                ok = self._target.is_call_target(pointee)
        return FentrySite(form, offset, code[:end]) if ok else None

    @staticmethod
    def _form_at(code: bytes, offset: int) -> SiteForm | None:
        head = code[offset : offset + 3]
        if head[:2] == ADDR32_CALL_OPCODE:
            return SiteForm.ADDR32_CALL
        if head[:2] == CALL_GOT_OPCODE:
            return SiteForm.CALL_GOT
        if head[:1] == CALL_REL32_OPCODE:
            return SiteForm.CALL_REL32
        if head == PREPARED_6_BYTES:
            return SiteForm.PREPARED_6
        if head[:2] == PREPARED_5_BYTES:
            return SiteForm.PREPARED_5
        return None


class BuildIdReader:
    """Reads the NT_GNU_BUILD_ID note."""

    @staticmethod
    def read(elf: ELFFile) -> bytes | None:
        for sec in elf.iter_sections():
            if not isinstance(sec, NoteSection):
                continue
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    return bytes.fromhex(note["n_desc"])
        return None


class CompileUnitFiles:
    """DWARF's answer to "which source file is this address in" (.debug_aranges), when present."""

    def __init__(self, elf: ELFFile) -> None:
        self._names: dict[int, str | None] = {}
        self._dwarf = None
        self._aranges = None
        try:
            if elf.has_dwarf_info():
                self._dwarf = elf.get_dwarf_info()
                self._aranges = self._dwarf.get_aranges()
        except DWARF_ERRORS:
            self._aranges = None  # debug info is optional: without it, globals have no file

    def file_at(self, addr: int) -> str | None:
        if self._aranges is None or self._dwarf is None or not self._aranges.entries:
            return None
        try:
            offset = self._aranges.cu_offset_at_addr(addr)
            if offset is None:
                return None
            if offset not in self._names:
                self._names[offset] = self._cu_name(offset)
            return self._names[offset]
        except DWARF_ERRORS:
            return None

    def _cu_name(self, offset: int) -> str | None:
        assert self._dwarf is not None
        attr = self._dwarf.get_CU_at(offset).get_top_DIE().attributes.get("DW_AT_name")
        if attr is None:
            return None
        value = attr.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class FunctionSymbolReader:
    """Reads the function symbols of .symtab (or .dynsym when stripped), with their files."""

    def __init__(self, elf: ELFFile) -> None:
        symtab = elf.get_section_by_name(".symtab")
        self.has_symtab = isinstance(symtab, SymbolTableSection)
        if not self.has_symtab:
            symtab = elf.get_section_by_name(".dynsym")
        self._symbols: list[Symbol] = (
            list(symtab.iter_symbols()) if isinstance(symtab, SymbolTableSection) else []
        )

    def fentry_addresses(self) -> frozenset[int]:
        """Where __fentry__ is, when the binary defines it."""
        return frozenset(
            s["st_value"] for s in self._symbols
            if s.name == FENTRY_SYMBOL and s["st_shndx"] != "SHN_UNDEF"
        )

    def functions(self) -> Iterator[tuple[Symbol, str | None]]:
        """Each defined function with a size, and the STT_FILE of the group it is in."""
        for sym, current_file in self._with_files():
            if sym["st_info"]["type"] == "STT_FUNC" and self._is_defined(sym):
                yield sym, current_file

    def variables(self) -> Iterator[DataSymbol]:
        """Each defined variable (STT_OBJECT, STT_TLS), with its STT_FILE when it is static."""
        for sym, current_file in self._with_files():
            kind = sym["st_info"]["type"]
            shndx = sym["st_shndx"]
            if kind not in ("STT_OBJECT", "STT_TLS") or not isinstance(shndx, int) or shndx == 0:
                continue
            local = sym["st_info"]["bind"] == "STB_LOCAL"
            yield DataSymbol(sym.name, sym["st_value"], sym["st_size"], local,
                             current_file if local else None, kind == "STT_TLS")

    def _with_files(self) -> Iterator[tuple[Symbol, str | None]]:
        """Each symbol and the STT_FILE of the group it is in (meaningful for local symbols)."""
        current_file: str | None = None
        for sym in self._symbols:
            if sym["st_info"]["type"] == "STT_FILE":
                current_file = sym.name or None
            else:
                yield sym, current_file

    @staticmethod
    def _is_defined(sym: Symbol) -> bool:
        shndx = sym["st_shndx"]
        return isinstance(shndx, int) and shndx != 0 and sym["st_size"] > 0


def has_debug_info(elf: ELFFile) -> bool:
    """Was the binary built with -g: has it a .debug_info section (compressed or not)?

    ELFFile.has_dwarf_info() also counts .eh_frame, which every program has.
    """
    return any(elf.get_section_by_name(n) is not None for n in (".debug_info", ".zdebug_info"))


def _read_functions(elf: ELFFile, reader: FunctionSymbolReader) -> tuple[FunctionInfo, ...]:
    image = MemoryImage(elf)
    decoder = EntrySiteDecoder(image, FentryTarget(reader.fentry_addresses(), image, DynamicRelocations(elf)))
    cu_files = CompileUnitFiles(elf)
    found = []
    for sym, group_file in reader.functions():
        local = sym["st_info"]["bind"] == "STB_LOCAL"
        addr, size = sym["st_value"], sym["st_size"]
        file = group_file if local else cu_files.file_at(addr)
        found.append(FunctionInfo(sym.name, addr, size, local, file, decoder.decode(addr, size)))
    return tuple(found)


def _check_machine(elf: ELFFile, path: Path) -> None:
    if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
        raise FentryError(
            f"{path} is a {elf.elfclass}-bit {elf['e_machine']} ELF file; "
            "fentry_build handles x86-64 programs and shared libraries only"
        )
    if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
        raise FentryError(
            f"{path} is not a linked program or shared library ({elf['e_type']}); "
            "pass the built program, not an object file"
        )


# What pyelftools raises on a file that is not a well-formed ELF file.
ELF_ERRORS = (ELFError, ConstructError, struct.error, ValueError, IndexError, OverflowError,
              MemoryError, AssertionError)


def read_elf(elf: ELFFile, path: Path) -> BinaryInfo:
    """What the generator and `check` need of the open ELF file `elf` (read from `path`).

    Raises FentryError for a file of another machine or kind, and pyelftools' errors
    (ELF_ERRORS) for a damaged one: see read_binary() and binary.program.Program.
    """
    _check_machine(elf, path)
    reader = FunctionSymbolReader(elf)
    return BinaryInfo(path, BuildIdReader.read(elf), reader.has_symtab,
                      _read_functions(elf, reader), tuple(reader.variables()),
                      has_debug_info(elf))


def program_name(path: Path) -> str:
    """The file name of the program at `path`; for /proc/PID/exe (what a process runs, read
    through the kernel even when the file was deleted or replaced since) the name of the file
    it was started from."""
    if path.name == "exe" and path.parent.parent == Path("/proc"):
        try:
            return Path(os.readlink(path).removesuffix(" (deleted)")).name
        except OSError:
            return path.name
    return path.name


def unreadable(path: Path, error: BaseException) -> FentryError:
    """The one-line error for a file read_elf() could not read."""
    if isinstance(error, OSError):
        return FentryError(f"cannot read {path}: {error.strerror or error}; pass the built program")
    return FentryError(
        f"{path} is not a readable ELF file ({error}); pass the built program or shared library")


def read_build_id(path: Path) -> bytes | None:
    """The GNU build-id of the ELF file at `path` (its notes only); FentryError if unreadable."""
    try:
        with open(path, "rb") as stream:
            return BuildIdReader.read(ELFFile(stream))
    except (OSError, *ELF_ERRORS) as e:
        raise unreadable(path, e) from None


def read_binary(path: Path) -> BinaryInfo:
    """Read a program or shared library; FentryError (one line) if it cannot be read as one."""
    try:
        with open(path, "rb") as stream:
            return read_elf(ELFFile(stream), path)
    except (OSError, *ELF_ERRORS) as e:
        raise unreadable(path, e) from None


def file_matches(file: str | None, wanted: str) -> bool:
    """Does the qualifier `wanted` name `file`? Either may be the longer path ("src/a.c" ~ "a.c")."""
    if file is None:
        return False
    a, b = posixpath.normpath(file), posixpath.normpath(wanted)
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def site_bytes_hex(site: FentrySite) -> str:
    """The site's own bytes as 'ff 15 8a 2f 00 00' (objdump's spelling)."""
    return " ".join(f"{b:02x}" for b in site.entry[site.offset :])


__all__ = [
    "ELF_ERRORS", "BinaryInfo", "CloneName", "DataSymbol", "FentrySite", "FunctionInfo", "SiteForm",
    "file_matches", "has_debug_info", "read_binary", "read_elf", "site_bytes_hex", "unreadable",
]
