"""client/attach_gdb.py - runs *inside gdb* (``gdb -batch -x``) for ``fentry-build attach``.

Standard library and gdb's own module only: gdb embeds the system's Python, not the
environment fentry_build is installed in.  ``fentry_build.client.attach`` does the thinking
that needs pyelftools (which addresses are the C library, which GOT slots hold
``__fentry__``) and hands this script a *plan* (JSON, path in $FENTRY_ATTACH_PLAN); this
script writes its *result* (JSON) to the path the plan names.  The plan's addresses are
run-time addresses of the target process.

What it does (docs/modes.md, "Attach: how and why it is safe"):

1. attach (all-stop: every thread stops) and pick a *host* thread that is at a safe
   point - see host_verdict(); when none is, detach, let the program run a moment
   and try again (bounded);
2. in the host thread, with gdb's inferior calls (gdb saves and restores every
   register of the thread): disable cancellation, block signals, dlopen the shim
   (RTLD_GLOBAL: patches call its fentry_shadow_* API; its constructor starts the
   control channel), dlsym its __fentry__, restore the signal mask and the cancel
   state.  Other threads run during the calls, so a lock
   one of them holds is released as usual;
3. with every thread stopped and none inside the dynamic linker (which could be
   binding a lazy __fentry__ slot), write the new __fentry__ address into each GOT
   slot: no thread runs while the 8 aligned bytes change, so no call sees half a
   pointer; read each back;
4. detach: the program runs on, every instrumented call now entering the shim.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import sys
import time
from typing import Any

# The plan's format (fentry_build/client/attach_plan.py, AttachPlan; the two must agree).
PLAN_VERSION = 1

# ---- the decision, free of gdb (unit-tested from the package) -------------------------

USER = "user"        # the program's own code (or any library that is not the C runtime)
LEAF = "leaf"        # a C-library function known to hold no lock (blocking syscall wrappers,
                     # glibc's __fentry__/mcount, the vDSO)
RUNTIME = "runtime"  # any other code of ld.so, libc or an allocator: may hold a lock
ENTRY = "entry"      # the program's entry point (_start), the bottom of the main thread


class Ranges:
    """Sorted, non-overlapping [start, end) ranges with a label each."""

    def __init__(self, triples: list[list[Any]]) -> None:
        items = sorted((int(s), int(e), str(label)) for s, e, label in triples)
        self._starts = [s for s, _, _ in items]
        self._items = items

    def find(self, addr: int) -> str | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, label = self._items[i]
            if start <= addr < end:
                return label
        return None


class Classifier:
    """Which kind of code an address is in, from the plan's ranges."""

    def __init__(self, ranges: dict[str, list[list[Any]]]) -> None:
        self.entry = Ranges(ranges.get("entry", []))
        self.leaf = Ranges(ranges.get("leaf", []))
        self.runtime = Ranges(ranges.get("runtime", []))
        self.ldso = Ranges(ranges.get("ldso", []))

    def kind(self, addr: int) -> tuple[str, str]:
        """(kind, label): the label names the function or module for messages."""
        label = self.entry.find(addr)
        if label is not None:
            return ENTRY, label
        label = self.leaf.find(addr)
        if label is not None:
            return LEAF, label
        label = self.runtime.find(addr)
        if label is not None:
            return RUNTIME, label
        return USER, ""

    def in_ldso(self, addr: int) -> bool:
        return self.ldso.find(addr) is not None


def host_verdict(pcs: list[int], sigtramp: bool, complete: bool,
                 classifier: Classifier) -> tuple[int | None, str]:
    """May this thread, stopped with this backtrace, run dlopen()?  (rank, why).

    rank is None when it may not, else lower is better.  pcs[0] is where the thread
    stopped; pcs[i > 0] are return addresses (looked up at pc - 1, the call).  Safe means:
    no frame of the thread is inside code that may hold a lock dlopen() or the shim's
    constructor needs (malloc's, the dynamic linker's, stdio's, the thread list's...),
    and the thread is not in a signal handler.  Shape of a safe backtrace:

        [leaf C-library calls]  user frames  [C-library thread start]  [_start]

    i.e. the program's own code, possibly blocked in a lock-free system-call wrapper
    it called itself, on a thread started by the C library.  Anything else - a callback
    called by the C library (qsort, dl_iterate_phdr, atexit, a signal handler), or any
    frame in other C-library code - is refused.
    """
    if not complete:
        return None, "its backtrace could not be read to the bottom"
    if sigtramp:
        return None, "it is running a signal handler"
    if not pcs:
        return None, "it has no frames"
    kinds = [classifier.kind(pc if i == 0 else pc - 1) for i, pc in enumerate(pcs)]
    i = 0
    while i < len(kinds) and kinds[i][0] == LEAF:
        i += 1
    if i == len(kinds) or kinds[i][0] != USER:
        kind, label = kinds[i] if i < len(kinds) else kinds[-1]
        return None, f"it is inside {label or kind} ({kind} code)"
    while i < len(kinds) and kinds[i][0] == USER:
        i += 1
    tail = kinds[i:]
    if tail and tail[-1][0] == ENTRY:
        tail = tail[:-1]
    for kind, label in tail:
        if kind not in (RUNTIME, LEAF):
            return None, f"the C library called the program's code ({label or kind} below it)"
    # Prefer a thread in its own code: one blocked in a system call wrapper has
    # asynchronous cancellation enabled (disabled for our calls, but still).
    return (0 if kinds[0][0] == USER else 1), "safe"


def threads_in_ldso(backtraces: dict[int, list[int]], classifier: Classifier) -> list[int]:
    """LWPs with a frame inside the dynamic linker (it may be writing a GOT slot)."""
    return [lwp for lwp, pcs in backtraces.items()
            if any(classifier.in_ldso(pc if i == 0 else pc - 1) for i, pc in enumerate(pcs))]


# ---- gdb --------------------------------------------------------------------------------

SIG_BLOCK, SIG_SETMASK = 0, 2
PTHREAD_CANCEL_DISABLE = 1
RTLD_NOW, RTLD_GLOBAL, RTLD_NODELETE = 0x2, 0x100, 0x1000
SIGSET_BYTES = 128          # glibc's sigset_t
STACK_GAP = 16384           # the part of the host's stack below its sp that we use
MAX_FRAMES = 512


class AttachError(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _gdb() -> Any:
    import gdb  # only inside gdb (mypy: ignore_missing_imports in pyproject.toml)

    return gdb


def _quiet(cmd: str) -> str:
    return _gdb().execute(cmd, to_string=True) or ""


def _setup() -> None:
    for cmd in (
        "set pagination off", "set confirm off", "set width 0", "set language c",
        "set print thread-events off", "set print inferior-events off",
        "set debuginfod enabled off", "set auto-load off",
        "set backtrace past-main on", "set backtrace past-entry on",
        f"set backtrace limit {MAX_FRAMES}",
        "set non-stop off",  # all-stop: every thread stops while we look
        # The program's signals are its own: pass every one without stopping, SIGINT
        # included.  The host thread blocks them during our calls (see _inject), so no
        # handler of the program runs inside dlopen; other threads take theirs as usual.
        "handle all nostop noprint pass",
        "handle SIGINT nostop noprint pass",
        # A last resort should gdb stop an injected call anyway: restore the thread's
        # registers rather than leave it parked inside the call.
        "set unwindonsignal on",
    ):
        try:
            _quiet(cmd)
        except Exception:  # an older gdb without a setting: not essential
            pass


def _after_attach() -> None:
    # While an injected call runs, the other threads run too, so a lock one of them
    # holds is released as it would be without us (needs a live target to be set).
    _quiet("set scheduler-locking off")


def _attach(pid: int) -> None:
    gdb = _gdb()
    _log("attach")
    try:
        _quiet(f"attach {pid}")
    except gdb.error as e:
        raise AttachError("attach", str(e).strip().splitlines()[-1] if str(e).strip() else "attach failed") from None
    if not gdb.selected_inferior().pid:
        raise AttachError("attach", f"gdb could not attach to process {pid}")
    _after_attach()
    _log("attached")


def _detach() -> None:
    gdb = _gdb()
    try:
        if gdb.selected_inferior().pid:
            _quiet("detach")
    except gdb.error:
        pass


def _backtrace(thread: Any) -> tuple[list[int], bool, bool]:
    """(pcs, sigtramp seen, reached the outermost frame normally) of a stopped thread."""
    gdb = _gdb()
    thread.switch()
    pcs: list[int] = []
    sigtramp = False
    frame = gdb.newest_frame()
    last = frame
    while frame is not None and len(pcs) < MAX_FRAMES:
        if frame.type() == gdb.SIGTRAMP_FRAME:
            sigtramp = True
        if frame.type() != gdb.INLINE_FRAME:
            pcs.append(int(frame.pc()))
        last = frame
        try:
            frame = frame.older()
        except gdb.error:
            return pcs, sigtramp, False
    complete = frame is None and last.unwind_stop_reason() == gdb.FRAME_UNWIND_OUTERMOST
    return pcs, sigtramp, complete


def _stack_room(pid: int, sp: int) -> int | None:
    """Bytes between sp and the bottom of its mapping; None for the growing main stack."""
    with open(f"/proc/{pid}/maps", "rb") as maps:  # bytes: a mapped file's path may not be UTF-8
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            if start <= sp < end:
                return None if len(fields) > 5 and fields[5] == b"[stack]" else sp - start
    return 0


def _pick_host(plan: dict[str, Any], classifier: Classifier,
               verdicts: list[str]) -> tuple[Any, str]:
    """The best safe thread now, or (None, why none is); each thread's verdict is added
    to `verdicts`.  No thread is chosen while any thread is inside the dynamic linker: it
    may hold the loader's lock while running a library's constructor, which could wait
    for a lock of the program that the host thread holds."""
    gdb = _gdb()
    best: tuple[int, int, Any] | None = None
    reasons = []
    in_ldso = []
    for thread in gdb.selected_inferior().threads():
        lwp = thread.ptid[1]
        pcs, sigtramp, complete = _backtrace(thread)
        if any(classifier.in_ldso(pc if i == 0 else pc - 1) for i, pc in enumerate(pcs)):
            in_ldso.append(lwp)
        rank, why = host_verdict(pcs, sigtramp, complete, classifier)
        if rank is not None:
            sp = int(gdb.parse_and_eval("$sp"))
            room = _stack_room(plan["pid"], sp)
            if room is not None and room < int(plan.get("stack_min", 65536)):
                rank, why = None, f"only {room} bytes of stack are left"
        verdicts.append(f"thread {lwp}: {why}")
        if rank is None:
            reasons.append(f"thread {lwp}: {why}")
            continue
        if best is None or (rank, thread.num) < best[:2]:
            best = (rank, thread.num, thread)
    if in_ldso:
        return None, f"threads {in_ldso} are inside the dynamic linker"
    return (best[2], "") if best else (None, "; ".join(reasons[:4]))


def _call(expr: str) -> int:
    gdb = _gdb()
    _log("call " + expr.split(")")[1][:40])
    try:
        value = gdb.parse_and_eval(expr)
    except gdb.error as e:
        raise AttachError("inject", f"the injected call failed: {str(e).strip().splitlines()[0]}") from None
    return int(value.cast(gdb.lookup_type("unsigned long")))


def _read_string(addr: int, limit: int = 512) -> str:
    raw = bytes(_gdb().selected_inferior().read_memory(addr, limit))
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _registers() -> dict[str, int]:
    gdb = _gdb()
    names = ["rip", "rsp", "rbp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "eflags"]
    frame = gdb.newest_frame()
    return {n: int(frame.read_register(n)) for n in names}


def _inject(plan: dict[str, Any], thread: Any) -> int:
    """In `thread`: dlopen the library and return its __fentry__ (see the top)."""
    gdb = _gdb()
    fn = plan["functions"]
    inferior = gdb.selected_inferior()
    thread.switch()
    saved = _registers()
    sp = saved["rsp"]
    # Our scratch memory lies below the thread's red zone, above the stack pointer the
    # calls run on, so neither they nor a signal frame can overwrite it.
    low_sp = (sp - 128 - STACK_GAP) & ~0xF
    scratch = low_sp + STACK_GAP // 2
    cancel_old = scratch
    mask_full = scratch + 16
    mask_old = mask_full + SIGSET_BYTES
    path = mask_old + SIGSET_BYTES
    lib = plan["library"].encode() + b"\0"
    name = path + len(lib)
    strings = lib + b"__fentry__\0"
    if name + 16 > sp - 128 or len(lib) > 4096:
        raise AttachError("inject", "the library path is too long")
    masked = cancel_off = False
    try:
        _quiet(f"set $sp = {low_sp:#x}")
        inferior.write_memory(mask_full, b"\xff" * SIGSET_BYTES)
        inferior.write_memory(path, strings)
        if _call(f"((int (*)(int, int *)) {fn['pthread_setcancelstate']:#x})"
                 f"({PTHREAD_CANCEL_DISABLE}, (int *) {cancel_old:#x})") != 0:
            raise AttachError("inject", "pthread_setcancelstate failed in the target")
        cancel_off = True
        if _call(f"((int (*)(int, void *, void *)) {fn['pthread_sigmask']:#x})"
                 f"({SIG_BLOCK}, (void *) {mask_full:#x}, (void *) {mask_old:#x})") != 0:
            raise AttachError("inject", "pthread_sigmask failed in the target")
        masked = True
        handle = _call(f"((void *(*)(const char *, int)) {fn['dlopen']:#x})"
                       f"((const char *) {path:#x}, {RTLD_NOW | RTLD_GLOBAL | RTLD_NODELETE})")
        if handle == 0:
            err = _call(f"((char *(*)(void)) {fn['dlerror']:#x})()")
            why = _read_string(err) if err else "unknown error"
            raise AttachError("dlopen", f"dlopen in the target failed: {why}")
        fentry = _call(f"((void *(*)(void *, const char *)) {fn['dlsym']:#x})"
                       f"((void *) {handle:#x}, (const char *) {name:#x})")
        if fentry == 0:
            raise AttachError("dlopen", f"{plan['library']} has no __fentry__")
        return fentry
    finally:
        try:
            if masked:
                _call(f"((int (*)(int, void *, void *)) {fn['pthread_sigmask']:#x})"
                      f"({SIG_SETMASK}, (void *) {mask_old:#x}, (void *) 0)")
            if cancel_off:
                old = struct.unpack("<i", bytes(inferior.read_memory(cancel_old, 4)))[0]
                _call(f"((int (*)(int, int *)) {fn['pthread_setcancelstate']:#x})"
                      f"({old}, (int *) 0)")
        finally:
            _quiet(f"set $sp = {sp:#x}")
            after = _registers()
            for reg, value in saved.items():
                if after[reg] != value:
                    _quiet(f"set ${reg} = {value:#x}")


def _all_backtraces() -> dict[int, list[int]]:
    out = {}
    for thread in _gdb().selected_inferior().threads():
        out[thread.ptid[1]] = _backtrace(thread)[0]
    return out


def _write_slots(plan: dict[str, Any], fentry: int) -> list[dict[str, Any]]:
    inferior = _gdb().selected_inferior()
    done = []
    for slot in plan["slots"]:
        addr = int(slot["addr"])
        if addr % 8:
            raise AttachError("switch", f"GOT slot {addr:#x} is not 8-byte aligned")
        old = struct.unpack("<Q", bytes(inferior.read_memory(addr, 8)))[0]
        if old != fentry and not any(lo <= old < hi for lo, hi in slot["accept"]):
            raise AttachError("switch", f"the __fentry__ slot at {addr:#x} of {slot['module']} "
                                        f"holds {old:#x}, not glibc's __fentry__; left alone")
        done.append({"addr": addr, "old": old, "module": slot["module"]})
    for entry in done:  # every thread is stopped: no call can see a half-written slot
        inferior.write_memory(entry["addr"], struct.pack("<Q", fentry))
        now = struct.unpack("<Q", bytes(inferior.read_memory(entry["addr"], 8)))[0]
        if now != fentry:
            raise AttachError("switch", f"writing the GOT slot at {entry['addr']:#x} did not stick")
        entry["new"] = fentry
    return done


def _pause(plan: dict[str, Any], attempt: int) -> None:
    _log(f"pause {attempt}")
    _detach()
    time.sleep(float(plan.get("pause", 0.02)) * (1 + attempt % 5))
    _attach(int(plan["pid"]))


_LOG: list[list[Any]] = []
_T0 = time.monotonic()


def _log(what: str) -> None:
    _LOG.append([round(time.monotonic() - _T0, 3), what])


def run(plan: dict[str, Any]) -> dict[str, Any]:
    classifier = Classifier(plan["ranges"])
    tries = int(plan.get("tries", 50))
    result: dict[str, Any] = {"ok": False, "tries": 0, "log": _LOG}
    try:
        _setup()
        _attach(int(plan["pid"]))
        fentry = int(plan.get("fentry") or 0)
        if not fentry:  # the library is not loaded yet
            why = ""
            for attempt in range(tries):
                result["tries"] = attempt + 1
                result["verdicts"] = []
                host, why = _pick_host(plan, classifier, result["verdicts"])
                if host is not None:
                    result["host"] = host.ptid[1]
                    fentry = _inject(plan, host)
                    break
                _pause(plan, attempt)
            else:
                raise AttachError("safe-point", f"no thread reached a safe point in {tries} tries "
                                                f"({why})")
        result["fentry"] = fentry
        for attempt in range(tries):
            busy = threads_in_ldso(_all_backtraces(), classifier)
            if not busy:
                break
            _pause(plan, attempt)
        else:
            raise AttachError("switch", f"threads {busy} stayed inside the dynamic linker")
        _log("write slots")
        result["slots"] = _write_slots(plan, fentry)
        result["ok"] = True
    except AttachError as e:
        result.update(stage=e.stage, error=str(e))
    except Exception as e:  # anything unexpected: report it, still detach
        result.update(stage="internal", error=f"{type(e).__name__}: {e}")
    finally:
        _detach()
        _log("detached")
    return result


def main() -> None:
    with open(os.environ["FENTRY_ATTACH_PLAN"]) as f:
        plan = json.load(f)
    if plan.get("version") != PLAN_VERSION:
        result: dict[str, Any] = {
            "ok": False, "stage": "plan",
            "error": f"the plan has version {plan.get('version')}; this gdb script reads "
                     f"version {PLAN_VERSION} (a mixed installation of fentry_build?)"}
    else:
        result = run(plan)
    with open(plan["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__" and "gdb" in sys.modules:
    main()
