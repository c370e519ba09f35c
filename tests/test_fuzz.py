"""Hostile input: the control protocol of a live process, and the generator's inputs.

1. The control socket of the running server example (the real shim and loader, in jump
   and dispatch mode) gets >= 100,000 generated and mutated request lines, pipelined on
   several connections at once, plus connections that send garbage, oversized lines,
   half lines, or vanish with a reset - while a client checks every TCP answer of the
   server.  Each line must get exactly one well-formed reply; afterwards the process is
   alive, `status` answers and a real apply still works.
2. The generator (fentry_build.gen.main, in-process) gets malformed ELF files (bytes of a
   real program flipped in its headers, section table, symbol table, notes and DWARF, or
   the file cut short) and malformed patch sources (token soup around FENTRY_REPLACE,
   with hypothesis; byte mutations of real patches).  Each must end in exit status 0 or
   in one line "fentry-gen: error: ..." (exit 1) - never a traceback, never a hang.

Seeds are fixed: a failure reproduces.  The figures are printed (pytest -s) and recorded
in docs/security.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import mmap
import random
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fentry_build.binary.program import Program
from fentry_build.client import control
from fentry_build.errors import FentryError
from fentry_build.generator import main as gen

from support.builds import EXAMPLE, PROGRAMS, ServerBuild, build_rel_patch, build_rel_program
from support.servers import (
    MODES,
    Server,
    assert_coherent,
    assert_fixed,
    assert_stops_cleanly,
    figures,
    patch_states,
    raw_connect,
    start_server,
)

pytestmark = [pytest.mark.stress]

# ---- 1. the control protocol of a live process ------------------------------------------------

PROTOCOL_INPUTS = 100_000   # request lines, pipelined
PROTOCOL_CONNECTIONS = 8    # at once (the shim serves up to 16)
PROTOCOL_BATCH = 2_000      # lines sent before their replies are read
ROGUE_CONNECTIONS = 300     # garbage, oversized lines, half lines, resets
LINE_MAX = 65536            # control.c: CTL_LINE_MAX

OPS = ["load", "revert", "unload", "list", "status", "LOAD", "lis", "", "load\u0000", "status "]
KEYS = ["op", "path", "name", "Op", "op ", "\u006fp", "extra", "", "\u00e9", "pa\\u0074h"]


@dataclass(frozen=True)
class Line:
    """A request line (no '\\n' in it) and what its reply must be, when that is known."""

    data: bytes
    expect: str | None = None  # "status", "list", "error" (ok false), None (any reply)


class RequestMaker:
    """Seeded generator of control requests: well-formed, odd, and mutated."""

    def __init__(self, seed: int, real_patch: Path) -> None:
        self.rng = random.Random(seed)
        self.real_patch = str(real_patch)

    def _string(self) -> str:
        r = self.rng
        return r.choice([
            "", "x", "fix_parse", "fix_parse.so", "/", "/etc/passwd", "/dev/zero", "/proc/self/mem",
            "relative/x.so", "/nonexistent/dir/p.so", "/tmp/" + "a" * r.randint(1, 300) + ".so",
            "/" + "b" * r.choice([255, 256, 4095, 4096, 5000]), "\u00e9\u4e2d\U0001f600",
            "a\"b\\c", "\t\r", "\u0001\u001f", "../../../etc/shadow", "/tmp/%s%s%n",
        ])

    def _value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(9 if depth < 3 else 6)
        return [lambda: self._string(), lambda: r.randint(-2**63, 2**64),
                lambda: r.random() * 10 ** r.randint(-300, 300), lambda: None, lambda: True,
                lambda: False, lambda: [self._value(depth + 1) for _ in range(r.randint(0, 4))],
                lambda: {self._string(): self._value(depth + 1) for _ in range(r.randint(0, 3))},
                lambda: [[[[[[]]]]]]][kind]()

    def well_formed(self) -> Line:
        r = self.rng
        op = r.choice(OPS)
        obj: dict[str, Any] = {"op": op}
        if op == "load" or r.random() < 0.2:
            obj["path"] = self.real_patch if r.random() < 0.002 else self._string()
        if op in ("revert", "unload") or r.random() < 0.2:
            obj["name"] = "fix_parse" if r.random() < 0.01 else self._string()
        for _ in range(r.choice([0, 0, 0, 1, 3])):
            obj[r.choice(KEYS)] = self._value()
        items = list(obj.items())
        r.shuffle(items)
        text = json.dumps(dict(items), ensure_ascii=r.random() < 0.5)
        if r.random() < 0.2:
            text = text.replace(",", " ,\t").replace(":", " : ")
        return Line(text.encode("utf-8", "surrogatepass"), self._expect(obj))

    @staticmethod
    def _expect(obj: dict[str, Any]) -> str | None:
        op, path = obj.get("op"), obj.get("path")
        if set(obj) == {"op"} and op in ("status", "list"):
            return str(op)
        if not isinstance(op, str) or op in ("", "LOAD", "lis"):
            return "error"  # no string "op", or an unknown one
        if op == "load" and isinstance(path, str) and path.startswith("/nonexistent"):
            return "error"
        return None

    def odd(self) -> Line:
        """Valid-looking and invalid JSON that a parser must get exactly right."""
        r = self.rng
        deep = r.randint(30, 40)
        return r.choice([
            Line(b'{"op":"status","op":"list"}', "error"),              # a member twice
            Line(b'{"op":' + b"[" * deep + b"]" * deep + b',"x":1}'),    # nesting at the limit
            Line(b'["op","status"]', "error"), Line(b'"status"', "error"), Line(b"null", "error"),
            Line(b"", "error"), Line(b"{}", "error"), Line(b"{", "error"), Line(b"}", "error"),
            Line(b'{"op":"status"}x', "error"), Line(b'{"op":"status"} {}', "error"),
            Line(b'{"op":"st\\u0000atus"}', "error"), Line(b'{"op":"\\ud800"}', "error"),
            Line(b'{"op":"\xff\xfe"}', "error"), Line(b'{"op":"\xc0\xaf"}', "error"),
            Line(b'{"op":"\x01"}', "error"), Line(b"{'op':'status'}", "error"),
            Line(b'{"op":"status",}', "error"), Line(b'{"op":status}', "error"),
            Line(b'{"op":"status"}\r'), Line(b'\xef\xbb\xbf{"op":"status"}'),
            Line(b'{"op":"status","n":1e999999}'), Line(b'{"op":"status","n":-0.0e-0}', "status"),
            Line(b'{"op":"status","n":01}', "error"), Line(b'{"op":"status","n":NaN}', "error"),
            Line(b' \t{"op" : "status" }\t ', "status"),
            Line(b'{"op":"\\ud83d\\ude00"}', "error"),                  # unknown op, valid pair
            Line(b'{"op":"load","path":"' + b"/x" * 3000 + b'"}', "error"),  # too long a path
        ])

    def mutated(self, base: bytes) -> Line:
        r = self.rng
        b = bytearray(base)
        for _ in range(r.choice([1, 1, 2, 3, 8])):
            what = r.randrange(5)
            pos = r.randrange(len(b) + 1)
            if what == 0 and b:
                b[min(pos, len(b) - 1)] = r.randrange(256)
            elif what == 1:
                b[pos:pos] = bytes([r.randrange(256)])
            elif what == 2 and b:
                del b[pos:pos + r.randint(1, 8)]
            elif what == 3:
                b[pos:pos] = r.choice([b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\\u",
                                       b"\\ud800", b"\x00", b"\xc3", b"\xed\xa0\x80", b'"op"'])
            else:
                start = r.randrange(len(b) + 1)
                b[pos:pos] = b[start:start + r.randint(1, 30)]
        return Line(bytes(b).replace(b"\n", b" "))

    def line(self) -> Line:
        r = self.rng.random()
        if r < 0.45:
            return self.well_formed()
        if r < 0.55:
            return self.odd()
        base = self.well_formed().data if self.rng.random() < 0.8 else self.odd().data
        return self.mutated(base)


# Errors that echo the request (unknown op, relative path) keep its CR/LF: the JSON line
# is fine, but the message a client prints is not one line.  control.c's reply_error()
# should blank control characters as loader.c's fail() does (docs/security.md).
LINE_BREAK = "error message with a line break"


def _check_reply(line: Line, raw: bytes, pid: int, outcome: Counter[str]) -> str | None:
    """None if `raw` is a proper reply to `line`, else what is wrong with it."""
    try:
        reply = json.loads(raw)
    except ValueError:
        return f"reply is not JSON: {raw[:200]!r}"
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return f"reply without a boolean ok: {raw[:200]!r}"
    outcome["ok" if reply["ok"] else "error"] += 1
    if not reply["ok"]:
        error = reply.get("error")
        if not isinstance(error, str) or not error:
            return f"error reply without an error: {raw[:200]!r}"
        if "\n" in error or "\r" in error:
            outcome[LINE_BREAK] += 1  # a known bug: see test_100000_hostile_requests...
    if line.expect == "error" and reply["ok"]:
        return f"accepted: {line.data[:200]!r} -> {raw[:200]!r}"
    if line.expect == "status" and not (reply["ok"] and reply.get("pid") == pid):
        return f"status: {line.data[:200]!r} -> {raw[:200]!r}"
    if line.expect == "list" and not (reply["ok"] and isinstance(reply.get("patches"), list)):
        return f"list: {line.data[:200]!r} -> {raw[:200]!r}"
    return None


def _pipelined(sock_path: Path, lines: list[Line], pid: int, outcome: Counter[str],
               problems: list[str]) -> None:
    """Send `lines` in batches on one connection; check each reply, in order."""
    with raw_connect(sock_path) as s:
        s.settimeout(60)
        buf = b""
        for start in range(0, len(lines), PROTOCOL_BATCH):
            batch = lines[start:start + PROTOCOL_BATCH]
            payload = b"".join(line.data + b"\n" for line in batch)
            sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
            sender.start()  # the replies are read meanwhile: neither side waits for the other
            for line in batch:
                while b"\n" not in buf:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        problems.append(f"connection closed; waiting for the reply to "
                                        f"{line.data[:200]!r}")
                        return
                    buf += chunk
                raw, buf = buf.split(b"\n", 1)
                wrong = _check_reply(line, raw, pid, outcome)
                if wrong is not None and len(problems) < 20:
                    problems.append(wrong)
            sender.join(timeout=60)


def _rogue(sock_path: Path, rng: random.Random, kinds: Counter[str]) -> None:
    """One connection that misbehaves in one of several ways."""
    kind = rng.choice(["garbage", "oversized", "half line", "reset", "half close",
                       "binary burst", "slow"])
    kinds[kind] += 1
    s = raw_connect(sock_path)
    try:
        if kind == "garbage":
            s.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))))
        elif kind == "oversized":
            try:
                s.sendall(b"{" + b"x" * (LINE_MAX + rng.randint(1, 4096)))
                s.sendall(b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = s.recv(65536)
            assert b"longer than" in data, data
        elif kind == "half line":
            s.sendall(b'{"op":"status"'[:rng.randint(1, 13)])
        elif kind == "reset":
            s.sendall(b'{"op":"list"}\n{"op":"status"}\n' * rng.randint(1, 50))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == "half close":
            s.sendall(b'{"op":"status"}\n')
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(s.recv(65536).split(b"\n")[0])
            assert reply["ok"] is True, reply
        elif kind == "binary burst":
            s.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) * 50 + b"\n")
        else:
            for piece in (b'{"o', b'p":"st', b'atus"}'):
                s.sendall(piece)
                time.sleep(0.001)
            s.sendall(b"\n")
            assert json.loads(s.recv(65536).split(b"\n")[0])["ok"] is True
    finally:
        s.close()


@pytest.mark.parametrize("mode", MODES)
def test_100000_hostile_requests_against_a_live_process(
        built: ServerBuild, loadclient: Path, started: list[Server], tmp_path: Path,
        mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    sock_path = control.socket_path(srv.pid)
    fix = built.patches["fix_parse"]
    makers = [RequestMaker(1000 + i, fix) for i in range(PROTOCOL_CONNECTIONS)]
    per_conn = PROTOCOL_INPUTS // PROTOCOL_CONNECTIONS
    work = [[m.line() for _ in range(per_conn)] for m in makers]
    outcome: Counter[str] = Counter()
    problems: list[str] = []
    # Meanwhile a client checks every TCP answer: old or new parse_request, nothing else.
    # (Phase 1 = "a change may be under way": both behaviours are allowed at any time.)
    phase_file = tmp_path / "phase"
    phase_file.write_bytes(struct.pack("=QQ", 1, 0))
    checker = subprocess.Popen([str(loadclient), str(srv.port), "2", str(phase_file), "300"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert checker.stdout is not None and checker.stdout.readline() == "started\n"
        begin = time.monotonic()
        threads = [threading.Thread(target=_pipelined,
                                    args=(sock_path, lines, srv.pid, outcome, problems))
                   for lines in work]
        for t in threads:
            t.start()
        rng = random.Random(77)
        rogue_kinds: Counter[str] = Counter()
        for _ in range(ROGUE_CONNECTIONS):
            _rogue(sock_path, rng, rogue_kinds)
        for t in threads:
            t.join(timeout=240)
            assert not t.is_alive(), "a pipelined connection did not finish"
        elapsed = time.monotonic() - begin
    finally:
        with open(phase_file, "r+b") as f, mmap.mmap(f.fileno(), 16) as shared, \
                memoryview(shared).cast("Q") as words:
            words[1] = 1
        out, err = checker.communicate(timeout=60)
    counts = {k: int(v) for k, v in (kv.split("=") for kv in out.split()[-6:])}
    replies = outcome["ok"] + outcome["error"]
    figures(f"control protocol fuzz ({mode})", inputs=PROTOCOL_INPUTS, replies=replies,
            ok=outcome["ok"], refused=outcome["error"], connections=PROTOCOL_CONNECTIONS,
            rogue_connections=ROGUE_CONNECTIONS, seconds=f"{elapsed:.1f}",
            tcp_requests=counts["requests"], tcp_wrong=counts["wrong"],
            tcp_failed=counts["failed"], problems=len(problems),
            line_breaks=outcome[LINE_BREAK], rogue=dict(rogue_kinds))
    assert problems == [], "\n".join(problems)
    assert replies == PROTOCOL_INPUTS
    assert checker.returncode == 0 and counts["wrong"] == 0 and counts["failed"] == 0, err
    # Alive and correct: status answers, the state is coherent, a real apply works.
    assert srv.alive()
    assert control.status(srv.pid)["pid"] == srv.pid
    if patch_states(srv).get("fix_parse") == "active":
        control.revert(srv.pid, "fix_parse")
    assert assert_coherent(srv) in ("none", "reverted")
    assert control.apply(srv.pid, fix)["ok"]
    assert_fixed(srv)
    assert_stops_cleanly(srv)
    assert outcome[LINE_BREAK] == 0, "an error message echoed a CR or LF of the request"


# ---- 2. the generator -----------------------------------------------------------------------


class Hang(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


@dataclass
class GenRun:
    rc: int | None
    stderr: str
    exception: BaseException | None


def run_gen(argv: list[str], seconds: int = 10) -> GenRun:
    """gen.main in-process, stderr captured, bounded by SIGALRM."""
    err = io.StringIO()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err):
            rc = gen.main(argv)
        return GenRun(rc, err.getvalue(), None)
    except SystemExit as e:  # argparse; allowed
        return GenRun(e.code if isinstance(e.code, int) else 2, err.getvalue(), None)
    except BaseException as e:  # noqa: BLE001 - this is what the fuzzer looks for
        return GenRun(None, err.getvalue(), e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def verdict(r: GenRun) -> str | None:
    """None for a clean run (0, or one error line and exit 1); else what was wrong."""
    if r.exception is not None:
        if isinstance(r.exception, (FentryError, SystemExit)):
            return None
        return "hang" if isinstance(r.exception, Hang) else "traceback"
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("fentry-gen: warning: ")]
    if r.rc == 0 and not lines:
        return None
    if r.rc == 1 and len(lines) == 1 and lines[0].startswith("fentry-gen: error: "):
        return None
    return f"unclean exit {r.rc}: {r.stderr[-300:]!r}"


def where(e: BaseException) -> str:
    """The innermost frame of fentry_build that the exception passed through."""
    ours = [f for f in traceback.extract_tb(e.__traceback__) if "/fentry_build/" in f.filename]
    f = ours[-1] if ours else traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__} in {Path(f.filename).name}:{f.name}"


# Known generator bugs, reported with their fixes (docs/security.md, "Found by these tests"):
# elf.MemoryImage reads a section whose size runs past the end of the file (MemoryError
# or OverflowError from pyelftools' read), and elf.CompileUnitFiles lets pyelftools'
# AssertionError out (a DWARF section missing once the section names are corrupt).
KNOWN_GEN_BUGS: tuple[str, ...] = ()  # fixed: section extents checked, DWARF errors caught


def judge_findings(what: str, findings: Counter[str], examples: dict[str, str]) -> None:
    unknown = {k: v for k, v in findings.items() if k not in KNOWN_GEN_BUGS}
    assert not unknown, f"{what}: " + "; ".join(f"{k} x{v}: {examples[k]}" for k, v in
                                                unknown.items())
    assert not findings, f"{what}: {dict(findings)}"


@pytest.fixture(scope="module")
def small_program(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small instrumented program with DWARF, and a patch of it."""
    d = tmp_path_factory.mktemp("genfuzz")
    prog = build_rel_program([PROGRAMS / "rel_crash.c"], d / "rel_crash")
    return prog, build_rel_patch(prog, PROGRAMS / "rel_crash_patch.c", d)


ELF_INPUTS = 200  # a fixed, seeded corpus: the same mutants on every run, however loaded the machine
ELF_REGIONS = [".symtab", ".strtab", ".shstrtab", ".note.gnu.build-id", "__mcount_loc",
               ".debug_info", ".debug_abbrev", ".debug_str", ".debug_line", ".debug_aranges",
               ".dynamic", ".dynsym", ".dynstr", ".rela.dyn"]


def elf_regions(binary: Path) -> dict[str, tuple[int, int]]:
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        regions = {"ELF header": (0, 64),
                   "program headers": (elf["e_phoff"], elf["e_phnum"] * elf["e_phentsize"]),
                   "section headers": (elf["e_shoff"], elf["e_shnum"] * elf["e_shentsize"])}
        for sec in elf.iter_sections():
            if sec.name in ELF_REGIONS and sec["sh_type"] != "SHT_NOBITS":
                regions[sec.name] = (sec["sh_offset"], sec["sh_size"])
    return regions


def mutate_elf(data: bytes, regions: dict[str, tuple[int, int]], rng: random.Random) -> tuple[str, bytes]:
    name = rng.choice([*regions, "ELF header", "section headers", "truncated"])
    b = bytearray(data)
    if name == "truncated":
        return name, bytes(b[:rng.randrange(len(b))])
    off, size = regions[name]
    for _ in range(rng.choice([1, 1, 2, 3, 8, 32])):
        p = off + rng.randrange(max(size, 1))
        if p >= len(b):
            continue
        r = rng.random()
        if r < 0.5:
            b[p] = rng.randrange(256)
        elif r < 0.75:
            b[p] ^= 1 << rng.randrange(8)
        else:  # a whole little-endian word: sizes and offsets become huge or zero
            word = rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, rng.randrange(1 << 32)])
            b[p:p + 4] = struct.pack("<I", word)
    return name, bytes(b[:len(data)])


def test_generator_survives_malformed_elf_files(small_program: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    prog, _ = small_program
    data = prog.read_bytes()
    regions = elf_regions(prog)
    rng = random.Random(4242)
    mutant, out = tmp_path / "mutant", tmp_path / "reg.c"
    results: Counter[str] = Counter()
    findings: Counter[str] = Counter()
    examples: dict[str, str] = {}
    begin, done = time.monotonic(), 0
    while done < ELF_INPUTS:
        region, blob = mutate_elf(data, regions, rng)
        mutant.write_bytes(blob)
        r = run_gen(["--binary", str(mutant), "--patch", str(PROGRAMS / "rel_crash_patch.c"),
                     "-o", str(out)])
        done += 1
        bad = verdict(r)
        if bad is None:
            results["generated" if r.rc == 0 else "refused"] += 1
            continue
        key = where(r.exception) if r.exception is not None else bad
        findings[key] += 1
        examples.setdefault(key, f"[{region}] " + (
            "".join(traceback.format_exception(r.exception))[-1200:] if r.exception else bad))
    figures("generator ELF fuzz", inputs=done, seconds=f"{time.monotonic() - begin:.0f}",
            refused=results["refused"], generated=results["generated"],
            failures=sum(findings.values()), by_kind=dict(findings))
    assert done == ELF_INPUTS and sum(results.values()) + sum(findings.values()) == done
    judge_findings("malformed ELF", findings, examples)


# A patch source with every macro, against rel_crash: the base the mutations start from.
RICH_PATCH = r'''/* a patch of rel_crash.c: "comments", 'quotes' and FENTRY_REPLACE(in, a comment) */
#include <fentry.h>
#if 0
FENTRY_REPLACE(not, really);
#endif
#define TWICE(x) ((x) * 2)
FENTRY_REF(rel_caller, int (const int *), "rel_crash.c");
FENTRY_DECLARE_ORIGINAL(rel_lookup);
static const char *why = "FENTRY_REPLACE(rel_lookup, fake) \" \\ ??/";
static int check(char *buf, size_t len) { (void)buf; (void)len; return 0; }
static void done(void) { }
static int rel_lookup_new(const int *p)
{
	int (*orig)(const int *) = FENTRY_ORIGINAL(rel_lookup, int (*)(const int *));
	return p ? TWICE(orig(p)) : FENTRY_VAR(rel_caller)(p) + 'x' + L'\x41';
}
FENTRY_REPLACE(rel_lookup, rel_lookup_new, "rel_crash.c");
FENTRY_PRE_PATCH(check);
FENTRY_POST_PATCH(done);
FENTRY_PRE_UNPATCH(done);
FENTRY_POST_UNPATCH(done);
FENTRY_REPLACE_ALL();
'''

SOURCE_TOKENS = [
    "FENTRY_REPLACE", "FENTRY_REF", "FENTRY_VAR", "FENTRY_ORIGINAL", "FENTRY_DECLARE_ORIGINAL",
    "FENTRY_PRE_PATCH", "FENTRY_POST_PATCH", "FENTRY_PRE_UNPATCH", "FENTRY_POST_UNPATCH",
    "FENTRY_REPLACE_ALL", "rel_lookup", "rel_caller", "main", "rel_lookup_new", "printf",
    "(", ")", ",", ";", "{", "}", "[", "]", "#", "##", "\\\n", "\n", " ", "\t", "/*", "*/", "//",
    '"', "'", '"rel_crash.c"', '"x.c"', '""', "'\\0'", '"\\"', "L\"wide\"", "u8\"x\"", "R\"(raw)\"",
    "#if 0", "#ifdef X", "#else", "#endif", "#define FENTRY_REPLACE(a, b)", "#include <fentry.h>",
    "0x1f", "1e+5", ".5", "int", "static", "const", "*", "&", "->", "...", "??/", "\u00e9",
    "\U0001f600", "\x00", "\x7f", "\r", "\f", "$ident",
]
CORE = ["FENTRY_REPLACE", "(", "rel_lookup", ",", "rel_lookup_new", ")", ";"]


def _gen_patch_source(source: bytes, out_dir: Path, binary: Path) -> GenRun:
    patch = out_dir / "fuzzed_patch.c"
    patch.write_bytes(source)
    return run_gen(["--binary", str(binary), "--patch", str(patch), "-o", str(out_dir / "reg.c")])


@contextlib.contextmanager
def fast_generator() -> Iterator[None]:
    """Open each binary once for every generator run (in-process speed; the ELF reader has
    its own fuzz test above).  The template environment is built once anyway (jinja.py)."""
    opened: dict[Path, Program] = {}
    real_open = Program.open

    def open_once(path: Path) -> Program:
        if Path(path) not in opened:
            opened[Path(path)] = real_open(Path(path))
        return opened[Path(path)]

    with mock.patch.object(Program, "open", open_once), \
            mock.patch.object(Program, "close", lambda self: None):
        yield
    for program in opened.values():
        program.close()


SOURCE_EXAMPLES = 400


def test_generator_survives_token_soup_around_fentry_replace(
        small_program: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    prog, _ = small_program
    out_dir = tmp_path_factory.mktemp("soup")
    findings: Counter[str] = Counter()
    examples: dict[str, str] = {}
    seen = Counter[str]()

    @settings(max_examples=SOURCE_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(before=st.lists(st.sampled_from(SOURCE_TOKENS) | st.text(max_size=4), max_size=12),
           core=st.lists(st.sampled_from(CORE + SOURCE_TOKENS), min_size=0, max_size=10),
           after=st.lists(st.sampled_from(SOURCE_TOKENS) | st.text(max_size=4), max_size=12),
           keep_core=st.booleans(), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]))
    def soup(before: list[str], core: list[str], after: list[str], keep_core: bool,
             encoding: str) -> None:
        tokens = before + (CORE if keep_core else core) + after
        text = " ".join(tokens)
        source = text.encode(encoding, "surrogatepass") if encoding != "latin-1" \
            else text.encode("utf-8", "surrogatepass")[:2000]
        r = _gen_patch_source(source, out_dir, prog)
        bad = verdict(r)
        seen["generated" if bad is None and r.rc == 0 else "refused" if bad is None else "bad"] += 1
        if bad is not None:
            key = where(r.exception) if r.exception is not None else bad
            findings[key] += 1
            examples.setdefault(key, repr(source[:300]) + " -> " + (
                "".join(traceback.format_exception(r.exception))[-800:] if r.exception else bad))

    begin = time.monotonic()
    with fast_generator():
        soup()
    figures("generator patch-source token soup (hypothesis)", inputs=sum(seen.values()),
            seconds=f"{time.monotonic() - begin:.0f}", refused=seen["refused"],
            generated=seen["generated"], failures=sum(findings.values()))
    judge_findings("token soup", findings, examples)


SOURCE_MUTATIONS = 1500


def test_generator_survives_mutated_patch_sources(small_program: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    prog, _ = small_program
    bases = [RICH_PATCH.encode(), (PROGRAMS / "rel_crash_patch.c").read_bytes(),
             (EXAMPLE / "patches" / "fix_parse.c").read_bytes()]
    rng = random.Random(99)
    results: Counter[str] = Counter()
    findings: Counter[str] = Counter()
    examples: dict[str, str] = {}
    begin = time.monotonic()
    with fast_generator():
        assert verdict(_gen_patch_source(bases[0], tmp_path, prog)) is None
        for _ in range(SOURCE_MUTATIONS):
            b = bytearray(rng.choice(bases))
            for _ in range(rng.choice([1, 1, 2, 4, 16])):
                p = rng.randrange(len(b) + 1)
                op = rng.randrange(4)
                if op == 0 and p < len(b):
                    b[p] = rng.randrange(256)
                elif op == 1:
                    del b[p:p + rng.randint(1, 20)]
                elif op == 2:
                    b[p:p] = rng.choice([b"(", b")", b",", b'"', b"'", b"/*", b"*/", b"\\\n",
                                         b"#if 0\n", b"#endif\n", b"FENTRY_REPLACE(", b"\x00",
                                         b"\xff", b"\n#", b"FENTRY_REF(x, int)"])
                else:
                    s = rng.randrange(len(b) + 1)
                    b[p:p] = b[s:s + rng.randint(1, 60)]
            r = _gen_patch_source(bytes(b), tmp_path, prog)
            bad = verdict(r)
            if bad is None:
                results["generated" if r.rc == 0 else "refused"] += 1
                continue
            key = where(r.exception) if r.exception is not None else bad
            findings[key] += 1
            examples.setdefault(key, repr(bytes(b)[:300]) + " -> " + (
                "".join(traceback.format_exception(r.exception))[-800:] if r.exception else bad))
    figures("generator patch-source mutations", inputs=SOURCE_MUTATIONS,
            seconds=f"{time.monotonic() - begin:.0f}", refused=results["refused"],
            generated=results["generated"], failures=sum(findings.values()))
    judge_findings("mutated patch sources", findings, examples)
