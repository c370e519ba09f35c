"""client/attach.py - ``fentry-build attach --pid PID``: bring the shim into a running process.

The program was built with the instrumentation flags but started without the shim, so
its calls of ``__fentry__`` go through a GOT slot to glibc's ``__fentry__`` (a gprof
helper that returns at once).  Attaching:

1. checks, without touching the process, that it may and should be done: the process
   exists and runs; we may ptrace it (uid, dumpable, Yama, not already traced, no
   seccomp filter that could kill it during dlopen); it does not have the shim yet
   (linked, preloaded or attached before: then nothing is done); it is instrumented
   (a GOT slot relocated against ``__fentry__``); the shared shim is readable from the
   process's mount namespace and by its user;
2. works out from /proc/PID/maps and the mapped ELF files (pyelftools) every address
   gdb will need: the GOT slots, glibc's dlopen & co., and which code is the C runtime;
3. runs gdb (``attach_gdb.py``), which loads the shim with dlopen in a thread stopped at
   a safe point and then points the GOT slots at the shim's ``__fentry__`` with every
   thread stopped (docs/modes.md explains why this is safe);
4. waits for the shim's control channel to answer ``status``.

Everything here that reads the process is a plain function the tests call directly.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_RELOC_TYPE_x64
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from fentry_build.build import sharedshim
from fentry_build.client import control
from fentry_build.errors import FentryError

FENTRY = "__fentry__"
SHIM_MARKER = "fentry_current_mode"  # exported by the shim only (fentry.h)
SLOT_RELOCS = frozenset({ENUM_RELOC_TYPE_x64["R_X86_64_GLOB_DAT"],
                         ENUM_RELOC_TYPE_x64["R_X86_64_JUMP_SLOT"]})
CAP_SYS_PTRACE = 19
GDB_SCRIPT = Path(__file__).resolve().parent / "attach_gdb.py"
CHANNEL_WAIT = 10.0   # seconds for the control channel to answer after the attach
GDB_TIMEOUT = 120.0   # the gdb script's own retries are bounded well below this

# C-library functions a thread may be stopped in and still host dlopen(): they take no
# lock (blocking system-call wrappers called by the program itself), plus glibc's
# profiling entry points that an unlinked instrumented program calls all the time.
LEAF_FUNCTIONS = frozenset({
    "__fentry__", "_mcount", "mcount",
    "accept", "accept4", "connect", "read", "readv", "write", "writev", "pread", "pread64",
    "pwrite", "pwrite64", "recv", "recvfrom", "recvmsg", "recvmmsg", "send", "sendto",
    "sendmsg", "sendmmsg", "poll", "ppoll", "select", "pselect", "epoll_wait", "epoll_pwait",
    "epoll_pwait2", "nanosleep", "clock_nanosleep", "usleep", "sleep", "pause", "sigsuspend",
    "sigwait", "sigwaitinfo", "sigtimedwait", "wait", "waitpid", "wait3", "wait4", "waitid", "msgrcv",
    "msgsnd", "semop", "semtimedop", "syscall", "fsync", "fdatasync", "clock_gettime",
    "gettimeofday", "time",
})
# What gdb calls in the target, from the C library.
TARGET_FUNCTIONS = ("dlopen", "dlerror", "dlsym", "pthread_sigmask", "pthread_setcancelstate")


# ---- /proc ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # "" for anonymous memory; "[vdso]", "[stack]"...

    @property
    def executable(self) -> bool:
        return "x" in self.perms


@dataclass(frozen=True)
class ProcStatus:
    name: str
    state: str
    ppid: int
    tracer: int
    uids: tuple[int, ...]
    gids: tuple[int, ...]
    seccomp: int


def _proc(pid: int) -> Path:
    p = Path("/proc") / str(pid)
    if pid <= 0 or not p.is_dir():
        raise FentryError(f"no process with pid {pid}")
    return p


def read_status(pid: int) -> ProcStatus:
    try:
        text = (_proc(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise FentryError(f"no process with pid {pid}") from None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcStatus(
        name=fields.get("Name", "?"),
        state=fields.get("State", "?").split()[0] if fields.get("State") else "?",
        ppid=int(fields.get("PPid", "0")),
        tracer=int(fields.get("TracerPid", "0")),
        uids=tuple(int(x) for x in fields.get("Uid", "").split()),
        gids=tuple(int(x) for x in fields.get("Gid", "").split()),
        seccomp=int(fields.get("Seccomp", "0")),
    )


def read_maps(pid: int) -> list[Mapping]:
    try:
        text = (_proc(pid) / "maps").read_text()
    except PermissionError:
        raise FentryError(f"cannot read /proc/{pid}/maps: permission denied; attach as the "
                          "user the process runs as, or as root") from None
    except (FileNotFoundError, ProcessLookupError):
        raise FentryError(f"no process with pid {pid}") from None
    maps = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        maps.append(Mapping(start, end, parts[1], int(parts[2], 16), int(parts[4]),
                            parts[5].strip() if len(parts) > 5 else ""))
    return maps


def _has_cap(cap: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


# ---- the ELF files mapped into the process ---------------------------------------------


@dataclass
class LoadedObject:
    """One ELF file mapped into the process, and what attach needs of it."""

    path: str                 # as /proc/PID/maps names it
    mappings: list[Mapping]
    base: int = 0             # load bias: run-time address = base + link-time address
    is_main: bool = False
    soname: str = ""
    entry: int = 0            # e_entry (link time)
    dynsym: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict)  # name -> (value, size, default version)
    fentry_slots: list[int] = field(default_factory=list)  # link-time GOT slot addresses
    defines_fentry: bool = False  # in .dynsym or .symtab
    start_sym: tuple[int, int] | None = None  # _start (value, size) from .symtab

    @property
    def exec_ranges(self) -> list[tuple[int, int]]:
        return [(m.start, m.end) for m in self.mappings if m.executable]

    def defines(self, name: str) -> bool:
        return name in self.dynsym

    def address(self, name: str) -> int:
        """Run-time address of the default version of a defined dynamic symbol."""
        entries = self.dynsym.get(name)
        if not entries:
            raise FentryError(f"{self.path} does not define {name}")
        chosen = next((e for e in entries if e[2]), entries[0])
        return self.base + chosen[0]

    @property
    def is_libc(self) -> bool:
        return self.defines("__libc_start_main")

    @property
    def is_ldso(self) -> bool:
        return self.soname.startswith("ld-linux") or Path(self.path).name.startswith("ld-linux")

    @property
    def is_allocator(self) -> bool:
        return self.defines("malloc") and not self.is_main

    @property
    def is_runtime(self) -> bool:
        """Code that may hold a lock dlopen() needs: the C runtime, the loader, an allocator
        (and glibc's libraries that were separate before 2.34)."""
        return (self.is_libc or self.is_ldso or self.is_allocator
                or self.soname.split(".so")[0] in ("libpthread", "libdl", "librt"))

    @property
    def is_shim(self) -> bool:
        return self.defines(FENTRY) and self.defines(SHIM_MARKER)


def _versym_hidden(elf: ELFFile, count: int) -> list[bool]:
    """Per .dynsym entry: True when its version is hidden (not the default, `@` not `@@`)."""
    sec = elf.get_section_by_name(".gnu.version")
    if sec is None:
        return [False] * count
    data = sec.data()
    n = min(count, len(data) // 2)
    return [bool(v & 0x8000) for v in struct.unpack_from(f"<{n}H", data)] + [False] * (count - n)


_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC = 1, 2, 10


def _read_dynsym(elf: ELFFile, obj: LoadedObject) -> None:
    """The defined functions and objects of .dynsym (read raw: pyelftools is slow here)."""
    dynsym = elf.get_section_by_name(".dynsym")
    if not isinstance(dynsym, SymbolTableSection):
        return
    strtab = elf.get_section(dynsym["sh_link"]).data()
    data = dynsym.data()
    count = len(data) // _SYM.size
    hidden = _versym_hidden(elf, count)
    for i in range(1, count):
        name_off, info, _, shndx, value, size = _SYM.unpack_from(data, i * _SYM.size)
        if shndx == 0 or info & 0xF not in (_STT_OBJECT, _STT_FUNC, _STT_GNU_IFUNC):
            continue
        end = strtab.find(b"\0", name_off)
        name = strtab[name_off:end].decode(errors="replace")
        obj.dynsym.setdefault(name, []).append((value, size, not hidden[i]))
    obj.defines_fentry = FENTRY in obj.dynsym


def _read_symtab(elf: ELFFile, obj: LoadedObject) -> None:
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return
    for name in (FENTRY, "_start"):
        for sym in symtab.get_symbol_by_name(name) or []:
            if sym["st_shndx"] == "SHN_UNDEF":
                continue
            if name == FENTRY:
                obj.defines_fentry = True
            else:
                obj.start_sym = (sym["st_value"], sym["st_size"])


def _read_fentry_slots(elf: ELFFile, obj: LoadedObject) -> None:
    for sec in elf.iter_sections():
        if not isinstance(sec, RelocationSection) or not sec["sh_flags"] & 0x2:
            continue
        symtab = elf.get_section(sec["sh_link"]) if sec["sh_link"] else None
        if not isinstance(symtab, SymbolTableSection):
            continue
        for rel in sec.iter_relocations():
            if rel["r_info_type"] in SLOT_RELOCS and rel["r_info_sym"] and \
                    symtab.get_symbol(rel["r_info_sym"]).name == FENTRY:
                obj.fentry_slots.append(rel["r_offset"])


def _read_soname(elf: ELFFile) -> str:
    for sec in elf.iter_sections():
        if isinstance(sec, DynamicSection):
            for tag in sec.iter_tags():
                if tag.entry.d_tag == "DT_SONAME":
                    return str(getattr(tag, "soname", ""))
    return ""


def _first_load_vaddr(elf: ELFFile) -> int:
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    if not loads:
        raise ELFError("no PT_LOAD segment")
    first = min(loads, key=lambda s: s["p_offset"])
    return int(first["p_vaddr"] - first["p_offset"]) & ~0xFFF


def _open_mapped(pid: int, obj: LoadedObject) -> Any:
    """The file behind a mapping: the very inode mapped, even if replaced or deleted since."""
    first = min(obj.mappings, key=lambda m: m.start)
    candidates = []
    if obj.is_main:
        candidates.append(f"/proc/{pid}/exe")
    candidates.append(f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}")
    if not obj.path.endswith(" (deleted)"):
        candidates.append(f"/proc/{pid}/root{obj.path}")
    for c in candidates:
        try:
            f = open(c, "rb")
        except OSError:
            continue
        if os.fstat(f.fileno()).st_ino == first.inode:
            return f
        f.close()
    raise FentryError(f"cannot read {obj.path} as mapped into process {pid}")


def loaded_objects(pid: int, maps: list[Mapping]) -> list[LoadedObject]:
    """The ELF files mapped into `pid`.  One that cannot be read is left out, except the
    program itself."""
    exe = os.readlink(f"/proc/{pid}/exe") if os.path.exists(f"/proc/{pid}/exe") else ""
    groups: dict[str, list[Mapping]] = {}
    for m in maps:
        if m.path.startswith("/") and m.inode:
            groups.setdefault(m.path, []).append(m)
    objects = []
    for path, mappings in groups.items():
        if not any(m.offset == 0 for m in mappings):
            continue
        obj = LoadedObject(path, mappings, is_main=(path == exe))
        try:
            with _open_mapped(pid, obj) as f:
                if f.read(4) != b"\x7fELF":
                    continue
                f.seek(0)
                elf = ELFFile(f)
                if elf["e_machine"] != "EM_X86_64":
                    continue
                obj.entry = elf["e_entry"]
                obj.soname = _read_soname(elf)
                zero = min((m for m in mappings if m.offset == 0), key=lambda m: m.start)
                obj.base = zero.start - _first_load_vaddr(elf) if elf["e_type"] == "ET_DYN" else 0
                _read_dynsym(elf, obj)
                if obj.is_main:
                    _read_symtab(elf, obj)
                if not obj.defines_fentry and not obj.is_runtime:
                    _read_fentry_slots(elf, obj)
        except FentryError:
            if obj.is_main:
                raise
            continue
        except (ELFError, OSError, struct.error, ValueError, KeyError):
            continue
        objects.append(obj)
    return objects


# ---- the checks that leave the process untouched ----------------------------------------


def check_permission(pid: int, st: ProcStatus) -> None:
    """Refuse (one line) when we may not ptrace `pid` or it cannot be attached now."""
    if st.state in ("Z", "X"):
        raise FentryError(f"process {pid} has exited (state {st.state})")
    if st.state in ("T", "t"):
        raise FentryError(f"process {pid} is stopped (state {st.state}); continue it first "
                          f"(kill -CONT {pid}) and attach again")
    privileged = _has_cap(CAP_SYS_PTRACE)
    me = os.geteuid()
    if not privileged:
        # The kernel's rule for PTRACE_ATTACH: our real uid and gid equal the target's
        # real, effective and saved ones.
        if any(u != os.getuid() for u in st.uids[:3]) or any(g != os.getgid() for g in st.gids[:3]):
            owner = st.uids[1] if len(st.uids) > 1 else -1
            raise FentryError(f"process {pid} runs as {_user(owner)}; only that user or root may "
                              "attach to it (ptrace permission)")
        if os.stat(_proc(pid)).st_uid != me:
            raise FentryError(f"process {pid} is not dumpable (setuid, or prctl(PR_SET_DUMPABLE, "
                              "0)); only root may attach to it")


def yama_scope() -> int:
    """kernel.yama.ptrace_scope, 0 when Yama is not there."""
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return 0


def check_attachable(pid: int, st: ProcStatus) -> None:
    """The checks that matter only once we know the shim is not there yet."""
    if st.tracer:
        raise FentryError(f"process {pid} is already traced by pid {st.tracer} ({_comm(st.tracer)}); "
                          "detach that debugger or tracer first")
    if st.seccomp == 1:
        raise FentryError(f"process {pid} runs in seccomp strict mode: dlopen in it would kill it")
    if st.seccomp == 2:
        raise FentryError(f"process {pid} runs under a seccomp filter, which may kill it for the "
                          "system calls dlopen and the control thread make; start it with "
                          "LD_PRELOAD=$(fentry-build shim-path) instead")
    scope = yama_scope()
    if scope >= 3:
        raise FentryError("ptrace is disabled on this system (kernel.yama.ptrace_scope=3); "
                          "start the program with LD_PRELOAD=$(fentry-build shim-path) instead")
    if scope == 2 and not _has_cap(CAP_SYS_PTRACE):
        raise FentryError("only root may ptrace here (kernel.yama.ptrace_scope=2); run attach "
                          "as root")
    env = control._target_environ(pid) or {}
    if env.get("FENTRY_CONTROL") == "0":
        raise FentryError(f"process {pid} runs with FENTRY_CONTROL=0, so the shim would serve "
                          "no control channel; start it without that setting")


def _accessible(path: Path, uid: int, gid: int) -> bool:
    """Could a process of uid/gid open `path` for reading (plain mode bits, no ACLs)?"""
    if uid == 0:
        return True
    parts = [path, *path.parents]
    for i, p in enumerate(parts):
        st = os.stat(p)
        want = stat.S_IROTH if i == 0 else stat.S_IXOTH
        if st.st_uid == uid:
            want <<= 6
        elif st.st_gid == gid:
            want <<= 3
        if not st.st_mode & want:
            return False
    return True


def check_library_reachable(pid: int, lib: Path, st: ProcStatus) -> None:
    """The target opens the library by path, in its own mount namespace and as its user."""
    mine = os.stat(lib)
    try:
        theirs = os.stat(f"/proc/{pid}/root{lib}")
    except OSError:
        theirs = None
    if theirs is None or (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
        raise FentryError(f"process {pid} does not see {lib} (it runs in another mount "
                          "namespace, e.g. a container); attach from inside it")
    uid = st.uids[1] if len(st.uids) > 1 else 0
    gid = st.gids[1] if len(st.gids) > 1 else 0
    if not _accessible(lib, uid, gid):
        raise FentryError(f"process {pid} (as {_user(uid)}) cannot read {lib}; set "
                          "XDG_CACHE_HOME to a folder that user can read, or attach as that user")


# ---- what is already there ---------------------------------------------------------------


@dataclass
class ShimPresence:
    where: str            # "linked into the program", "loaded from /x/libfentry.so"
    fentry: int = 0       # run-time address of the shim's __fentry__ (0 when linked)
    unswitched: list[int] = field(default_factory=list)  # slots not pointing at it yet


def _read_mem_u64(pid: int, addr: int) -> int | None:
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(addr)
            data = f.read(8)
        return struct.unpack("<Q", data)[0] if len(data) == 8 else None
    except (OSError, OverflowError):
        return None


def _channel_answers(pid: int) -> bool:
    try:
        control.request(pid, {"op": "status"}, timeout=2.0)
        return True
    except FentryError:
        return False


def shim_presence(pid: int, objects: list[LoadedObject]) -> ShimPresence | None:
    main = next((o for o in objects if o.is_main), None)
    if main is not None and main.defines_fentry:
        return ShimPresence("linked into the program")
    shim = next((o for o in objects if o.is_shim and not o.is_main), None)
    if shim is not None:
        fentry = shim.address(FENTRY)
        slots = [o.base + s for o in objects for s in o.fentry_slots]
        unswitched = [s for s in slots if _read_mem_u64(pid, s) not in (fentry,)]
        return ShimPresence(f"loaded from {shim.path}", fentry, unswitched)
    if _channel_answers(pid):
        return ShimPresence("serving its control channel")
    return None


def foreign_fentry(objects: list[LoadedObject]) -> LoadedObject | None:
    """A __fentry__ that is neither glibc's nor the shim's (another profiler's)."""
    return next((o for o in objects if o.defines_fentry and not o.is_libc and not o.is_shim
                 and not o.is_main), None)


# ---- the plan for gdb --------------------------------------------------------------------


DEFAULT_TRIES = 60


def build_plan(pid: int, maps: list[Mapping], objects: list[LoadedObject], library: Path,
               presence: ShimPresence | None = None, tries: int = DEFAULT_TRIES) -> dict[str, Any]:
    libc = next((o for o in objects if o.is_libc), None)
    if libc is None:
        raise FentryError(f"process {pid} has no C library mapped (statically linked?); "
                          "attach needs glibc's dlopen")
    runtime, leaf, ldso, entry = [], [], [], []
    for o in objects:
        name = Path(o.path).name
        if o.is_runtime:
            runtime += [[s, e, name] for s, e in o.exec_ranges]
        if o.is_ldso:
            ldso += [[s, e, name] for s, e in o.exec_ranges]
        if o.is_main:
            start, size = o.start_sym if o.start_sym else (o.entry, 64)
            entry.append([o.base + start, o.base + start + max(size, 1), "_start"])
    for fname in sorted(LEAF_FUNCTIONS):
        for value, size, _ in libc.dynsym.get(fname, []):
            if size:
                leaf.append([libc.base + value, libc.base + value + size, fname])
    leaf += [[m.start, m.end, "vdso"] for m in maps if m.path == "[vdso]"]
    # Leaf extents lie inside libc's runtime ranges: the classifier looks at leaf first.
    glibc_fentry = libc.address(FENTRY) if libc.defines(FENTRY) else 0
    slots = []
    for o in objects:
        for s in o.fentry_slots:
            accept = []
            if glibc_fentry:
                accept.append([glibc_fentry, glibc_fentry + 1])
            accept += [[lo, hi] for lo, hi in o.exec_ranges]  # a lazy slot: still its PLT
            slots.append({"addr": o.base + s, "module": o.path, "accept": accept})
    if presence is not None:
        slots = [s for s in slots if s["addr"] in presence.unswitched]
    return {
        "pid": pid,
        "library": str(library),
        "functions": {f: libc.address(f) for f in TARGET_FUNCTIONS},
        "ranges": {"runtime": runtime, "leaf": _dedupe(leaf), "ldso": ldso, "entry": entry},
        "slots": slots,
        "fentry": presence.fentry if presence is not None else 0,
        "tries": max(1, tries),
        "pause": 0.02,
        "stack_min": 65536,
    }


def _dedupe(ranges: list[list[Any]]) -> list[list[Any]]:
    """Sorted ranges without overlaps (aliases of one function appear once)."""
    out: list[list[Any]] = []
    for s, e, label in sorted(ranges):
        if out and s < out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
            continue
        out.append([s, e, label])
    return out


# ---- running gdb -------------------------------------------------------------------------


def _gdb_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "DEBUGINFOD")) and k != "LD_PRELOAD"}
    env["LC_ALL"] = "C"
    return env


def run_gdb(plan: dict[str, Any], timeout: float = GDB_TIMEOUT) -> dict[str, Any]:
    gdb = shutil.which("gdb")
    if gdb is None:
        raise FentryError("attach needs gdb (apt-get install gdb), or start the program with "
                          "LD_PRELOAD=$(fentry-build shim-path)")
    with tempfile.TemporaryDirectory(prefix="fentry-attach-") as tmp:
        plan = dict(plan, result=str(Path(tmp) / "result.json"))
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        env = _gdb_env()
        env["FENTRY_ATTACH_PLAN"] = str(plan_path)
        cmd = [gdb, "-nx", "-nh", "-q", "-batch", "-x", str(GDB_SCRIPT)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FentryError(f"gdb did not finish attaching to process {plan['pid']} within "
                              f"{timeout:g} s; the process may be left stopped or damaged") from None
        result_path = Path(plan["result"])
        if not result_path.exists():
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise FentryError(f"gdb failed before attaching to process {plan['pid']}: {last}")
        result: dict[str, Any] = json.loads(result_path.read_text())
        result["gdb_stderr"] = proc.stderr[-4000:]
        return result


def _explain(pid: int, result: dict[str, Any]) -> FentryError:
    stage, error = result.get("stage", "?"), result.get("error", "failed")
    if stage == "attach":
        if "not permitted" in error:
            hint = ("ptrace is not permitted: another user's process, Yama "
                    "(kernel.yama.ptrace_scope), a seccomp filter or a container without "
                    "CAP_SYS_PTRACE")
            return FentryError(f"cannot attach to process {pid}: {hint}; the process was not touched")
        return FentryError(f"cannot attach to process {pid}: {error}; the process was not touched")
    if stage == "safe-point":
        return FentryError(f"attach to process {pid} gave up: {error}; the process was not "
                           "changed - try again")
    return FentryError(f"attach to process {pid} failed ({stage}): {error}")


def _wait_for_channel(pid: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return control.status(pid)
        except FentryError as e:
            if time.monotonic() >= deadline:
                raise FentryError(f"the shim was loaded into process {pid} but its control "
                                  f"channel does not answer ({e}); see the program's stderr") from None
            time.sleep(0.05)


# ---- the command ------------------------------------------------------------------------


def attach(pid: int, *, library: Path | None = None, tries: int = DEFAULT_TRIES) -> dict[str, Any]:
    """Bring the shim into process `pid`.  Returns a report (``attached`` false when the
    shim was already there and nothing was done); raises FentryError with one line,
    leaving the process untouched, when it cannot be done."""
    st = read_status(pid)
    check_permission(pid, st)
    maps = read_maps(pid)
    objects = loaded_objects(pid, maps)
    main = next((o for o in objects if o.is_main), None)
    program = main.path if main else os.path.realpath(f"/proc/{pid}/exe")
    presence = shim_presence(pid, objects)
    if presence is not None and not presence.unswitched:
        return {"attached": False, "pid": pid, "program": program,
                "message": f"process {pid} already has the fentry shim ({presence.where}); "
                           "nothing to do - use fentry-build apply"}
    other = foreign_fentry(objects)
    if other is not None:
        raise FentryError(f"process {pid} uses the __fentry__ of {other.path}, which is not the "
                          "fentry shim; attach leaves it alone")
    if not any(o.fentry_slots for o in objects):
        raise FentryError(f"process {pid} ({program}) is not instrumented: nothing in it calls "
                          "__fentry__ through a GOT slot; build it with -pg -mfentry (Meson: "
                          "instrument_dep) and without the shim")
    check_attachable(pid, st)
    lib = library if library is not None else sharedshim.shim_path()
    lib = Path(os.path.abspath(lib))
    if presence is None:
        check_library_reachable(pid, lib, st)
    plan = build_plan(pid, maps, objects, lib, presence, tries)
    result = run_gdb(plan)
    if not result.get("ok"):
        raise _explain(pid, result)
    status = _wait_for_channel(pid, CHANNEL_WAIT)
    return {
        "attached": True,
        "pid": pid,
        "program": program,
        "library": str(lib) if presence is None else presence.where,
        "fentry": result.get("fentry"),
        "slots": len(result.get("slots", [])),
        "host_thread": result.get("host"),
        "tries": result.get("tries"),
        "mode": status.get("mode"),
        "socket": str(control.socket_path(pid)),
    }


def format_attach(report: dict[str, Any]) -> str:
    if not report["attached"]:
        return str(report["message"])
    slots = report["slots"]
    return (f"attached the fentry shim to process {report['pid']} ({report['program']}): "
            f"{slots} __fentry__ slot{'s' if slots != 1 else ''} switched to {report['library']}; "
            f"mode {report['mode']}; control channel {report['socket']}")


__all__ = ["attach", "format_attach", "build_plan", "loaded_objects", "read_maps",
           "read_status", "shim_presence", "run_gdb"]


if __name__ == "__main__":  # pragma: no cover - python -m fentry_build.client.attach PID
    print(format_attach(attach(int(sys.argv[1]))))
