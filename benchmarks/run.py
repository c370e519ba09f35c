#!/usr/bin/env python3
"""run.py - the fentry_build benchmark suite, in one command.

    python benchmarks/run.py            # the full run, writes RESULTS.md
    python benchmarks/run.py --quick    # every variant once, tiny counts: correctness only
    python benchmarks/run.py --scaling-only [--rows KEY,...]   # the scaling section alone,
                                        # put into RESULTS.md in place of the old one

Four benchmarks, each over its variants side by side in one run:

- micro: a tiny function (tiny.c) called 10^8 times from another translation unit, ns per
  call: uninstrumented, instrumented in dispatch and jump mode, unpatched / patched /
  with a patch of another function active, a direct call of the replacement's code, and
  LLVM XRay unpatched / patched when clang is installed;
- apply: fentry_apply() + fentry_revert() in-process, 1000 cycles, per mode, with the
  program idle and with a thread calling the patched function meanwhile;
- macro: the example server (examples/server) under load from a client on 127.0.0.1,
  requests/s: plain build, instrumented in jump and dispatch mode, and patched;
- scaling: generated programs of N functions and patches of K (benchmarks/scaling/): rows
  of "now vs target", each defined in a benchmarks/scaling/rows_*.py module.

Method (a 2-core VM shared with other work): the variants of a benchmark run round-robin,
one process per measurement, R rounds, each round starting one variant further on; the
figure of a variant is the median over rounds, and its ratio is the median of its
per-round ratios to the reference measured in the same round.  Nothing is pinned.  Every
run also checks its result: which function ran, which mode the shim is in, that the
patched variants ran the replacement; a wrong result fails the whole run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "scaling"))
import harness  # noqa: E402  (benchmarks/scaling/harness.py)
from programs import Programs  # noqa: E402  (benchmarks/scaling/programs.py)

from fentry_build import paths  # noqa: E402
from fentry_build.client import control  # noqa: E402
from fentry_build.errors import FentryError  # noqa: E402

import build  # noqa: E402  (benchmarks/build.py; it also makes fentry_build importable)

HERE = Path(__file__).resolve().parent
MICRO = HERE / "micro"
MACRO = HERE / "macro"


# ---- settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    micro_calls: int
    micro_rounds: int
    apply_cycles: int
    apply_rounds: int
    macro_seconds: float
    macro_max_requests: int
    macro_rounds: int
    many_functions: int  # the large program of the apply benchmark
    macro_conns: int = 4  # = the server's worker threads: each connection has one
    # Requests per round trip.  1: the server writes each answer with its own send() and
    # leaves Nagle on, so pipelined answers wait for the client's delayed ACK (40 ms).
    macro_depth: int = 1


FULL = Settings(micro_calls=100_000_000, micro_rounds=21, apply_cycles=1000, apply_rounds=5,
                macro_seconds=2.0, macro_max_requests=5_000_000, macro_rounds=9,
                many_functions=20_000)
QUICK = Settings(micro_calls=100_000, micro_rounds=1, apply_cycles=20, apply_rounds=1,
                 macro_seconds=0.2, macro_max_requests=2_000, macro_rounds=1,
                 many_functions=200)


class BenchError(Exception):
    """A variant failed or gave a wrong result: the run is not valid."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clean_env(extra: dict[str, str], runtime_dir: Path) -> dict[str, str]:
    """Our environment without FENTRY_*/XRAY_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FENTRY_", "XRAY_", "LD_PRELOAD"))}
    env["FENTRY_RUNTIME_DIR"] = str(runtime_dir)  # control sockets, off the user's dir
    env.update(extra)
    return env


def kv(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def execute(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(cmd)}: no result within {timeout:g} s") from None
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    if proc.stderr.strip():
        raise BenchError(f"{shlex.join(cmd)} wrote to stderr:\n{proc.stderr}")
    return kv(proc.stdout.strip().splitlines()[-1])


def rotate(items: list, by: int) -> list:
    by %= max(len(items), 1)
    return items[by:] + items[:by]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- micro ---------------------------------------------------------------------------


@dataclass
class MicroVariant:
    key: str
    label: str
    cmd: list[str]             # program and arguments, the call count appended first
    env: dict[str, str]
    expect: dict[str, str]     # output fields that must have exactly these values
    group: str = "main"        # "forms": the site-forms experiment (siteforms.c)
    ns: list[float] = field(default_factory=list)  # one per round, rounds aligned
    wall: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    ratio_direct: list[float] = field(default_factory=list)


def build_micro(b: build.Builder, with_clang: bool, runtime: Path) -> list[MicroVariant]:
    tiny = [MICRO / "micro.c", MICRO / "tiny.c"]
    plain = b.plain(tiny, "micro_plain")
    direct = b.plain([*tiny, MICRO / "direct.c"], "micro_direct", ["-DCALL_DIRECT"])
    libdirect = b.shared_lib([MICRO / "direct.c"], "direct")
    direct_so = b.plain(tiny, "micro_direct_so", ["-DCALL_DIRECT"], libs=[libdirect])
    forms = b.plain([MICRO / "siteforms.c"], "siteforms", libs=[libdirect])
    fentry = b.instrumented(tiny, "micro_fentry", ["-DFENTRY_SHIM"])
    # The floors of dispatch mode: instrumented, no shim, a __fentry__ that does (almost)
    # nothing (micro/fentry_floor.S); no -mrecord-mcount without the shim's section.
    unlinked = [f for f in b.instrument if f != "-mrecord-mcount"]
    floor_ret = b._compile_link("gcc", [*tiny, MICRO / "fentry_floor.S"], "micro_floor_ret",
                                [*unlinked, "-DFLOOR_RET"])
    floor_branch = b._compile_link("gcc", [*tiny, MICRO / "fentry_floor.S"],
                                   "micro_floor_branch", [*unlinked, "-DFLOOR_BRANCH"])
    tiny_patch = b.patch(fentry, MICRO / "tiny_patch.c", "micro")
    other_patch = b.patch(fentry, MICRO / "other_patch.c", "micro")

    def env(extra: dict[str, str] | None = None) -> dict[str, str]:
        return clean_env(extra or {}, runtime)

    dispatch = {"FENTRY_MODE": "dispatch"}
    jump = {"FENTRY_MODE": "jump"}
    orig = {"sum_ok": "1", "other5": "4"}
    v = [
        MicroVariant("plain", "uninstrumented (gcc -O2)", [str(plain), "tiny"], env(),
                     {"mode": "plain", **orig}),
        MicroVariant("direct", "direct call of the replacement's code (gcc -O2)",
                     [str(direct), "repl"], env(), {"mode": "plain", **orig}),
        MicroVariant("direct_so", "(context) the replacement's code in a shared library, "
                     "called through the PLT", [str(direct_so), "repl"], env(),
                     {"mode": "plain", **orig}),
        MicroVariant("dispatch_unpatched", "dispatch, unpatched", [str(fentry), "tiny"],
                     env(dispatch), {"mode": "dispatch", **orig}),
        MicroVariant("dispatch_miss", "dispatch, table active (another function patched)",
                     [str(fentry), "tiny", str(other_patch)], env(dispatch),
                     {"mode": "dispatch", "sum_ok": "1", "other5": "105"}),
        MicroVariant("dispatch_patched", "dispatch, patched", [str(fentry), "repl",
                     str(tiny_patch)], env(dispatch), {"mode": "dispatch", **orig}),
        MicroVariant("dispatch_floor", "floor of dispatch, unpatched: `__fentry__` only `ret` "
                     "(no shim)", [str(floor_ret), "tiny"], env(), {"mode": "plain", **orig}),
        MicroVariant("dispatch_branch_floor", "floor of dispatch, table active: `__fentry__` "
                     "loads, tests, takes one branch to `ret` (no lookup, no shim)",
                     [str(floor_branch), "tiny"], env(), {"mode": "plain", **orig}),
        MicroVariant("jump_unpatched", "jump, unpatched (site = `test`)", [str(fentry), "tiny"],
                     env(jump), {"mode": "jump", **orig}),
        MicroVariant("jump_patched", "jump, patched (site = jmp)", [str(fentry), "repl",
                     str(tiny_patch)], env(jump), {"mode": "jump", **orig}),
    ]
    v += [MicroVariant(f"form_{f}", label, [str(forms), f], env(), {"mode": f, "sum_ok": "1"},
                       group="forms")
          for f, label in (("local", "no site: direct call of the replacement's code"),
                           ("near", "site `e9 rel32` straight to the code (within 2 GiB): a "
                                    "placed patch loaded near (poke.c)"),
                           ("near2", "site `e9 rel32` → trampoline `e9 rel32` → the code: a "
                                     "patch loaded near, not placed"),
                           ("tramp", "site `e9 rel32` → trampoline `ff 25` → shared library: "
                                     "a patch not loaded near"),
                           ("mem", "site `ff 25 rel32`: `jmp *slot(%rip)` → shared library"))]
    if with_clang:
        clang_plain = b.plain(tiny, "micro_clang", cc="clang")
        xray = b.xray(tiny, "micro_xray", ["-DBENCH_XRAY"])
        xenv = env({"XRAY_OPTIONS": "patch_premain=false"})
        v += [
            MicroVariant("clang_plain", "uninstrumented (clang -O2)", [str(clang_plain), "tiny"],
                         env(), {"mode": "plain", **orig}),
            MicroVariant("xray_unpatched", "LLVM XRay, unpatched", [str(xray), "tiny"], xenv,
                         {"mode": "xray", "xray_tiny_entries": "0", **orig}),
            MicroVariant("xray_patched", "LLVM XRay, patched (__xray_patch, counting handler)",
                         [str(xray), "tiny", "patch"], xenv, {"mode": "xray", **orig}),
        ]
    return v


def run_micro(variants: list[MicroVariant], s: Settings) -> None:
    for r in range(s.micro_rounds):
        got: dict[str, float] = {}
        for var in rotate(variants, r):
            cmd = [var.cmd[0], str(s.micro_calls), *var.cmd[1:]]
            out = execute(cmd, var.env, timeout=120)
            for k, want in var.expect.items():
                if out.get(k) != want:
                    raise BenchError(f"micro {var.key}: {k}={out.get(k)}, expected {want} "
                                     f"({shlex.join(cmd)})")
            if var.key == "xray_patched":  # every call of tiny() reached the handler
                calls = s.micro_calls + int(out["warm_calls"])
                if int(out["xray_tiny_entries"]) != calls:
                    raise BenchError(f"micro xray_patched: handler saw "
                                     f"{out['xray_tiny_entries']} entries of tiny(), not {calls}")
            var.ns.append(float(out["ns_per_call"]))
            var.wall.append(float(out["wall_ns_per_call"]))
            got[var.key] = float(out["ns_per_call"])
        for var in variants:
            var.ratio.append(got[var.key] / got["plain"])
            var.ratio_direct.append(got[var.key] / got["direct"])
        log(f"  micro round {r + 1}/{s.micro_rounds}: " +
            " ".join(f"{k}={v:.2f}" for k, v in got.items()))


# ---- apply latency -------------------------------------------------------------------


@dataclass
class ApplyVariant:
    key: str
    label: str
    mode: str
    busy: int
    prog: Path
    patch: Path
    results: list[dict[str, str]] = field(default_factory=list)

    def med(self, name: str) -> float:
        return median([float(r[name]) for r in self.results])


def build_apply(b: build.Builder, s: Settings) -> list[ApplyVariant]:
    """The apply program, and the same with `s.many_functions` more functions (sites)."""
    prog = b.instrumented([MICRO / "apply.c", MICRO / "tiny.c"], "apply")
    patch = b.patch(prog, MICRO / "tiny_patch.c", "apply")
    many_c = b.out / "many.c"
    many_c.write_text("/* generated by benchmarks/run.py: functions that are never called */\n" +
                      "".join(f"long many_{i}(long x);\nlong many_{i}(long x) {{ return x + {i}; }}\n"
                              for i in range(s.many_functions)))
    big = b.instrumented([MICRO / "apply.c", MICRO / "tiny.c", many_c], "apply_many")
    big_patch = b.patch(big, MICRO / "tiny_patch.c", "apply_many")
    v = [ApplyVariant(f"{m}_{'busy' if busy else 'idle'}",
                      f"{m}, {'one thread calling tiny()' if busy else 'idle program'}",
                      m, busy, prog, patch)
         for m in ("jump", "dispatch") for busy in (0, 1)]
    v += [ApplyVariant(f"{m}_many", f"{m}, idle program with {s.many_functions:,} more "
                       "functions", m, 0, big, big_patch) for m in ("jump", "dispatch")]
    return v


def run_apply(variants: list[ApplyVariant], s: Settings, runtime: Path) -> list[ApplyVariant]:
    for r in range(s.apply_rounds):
        for var in rotate(variants, r):
            env = clean_env({"FENTRY_MODE": var.mode}, runtime)
            out = execute([str(var.prog), str(var.patch), str(s.apply_cycles), str(var.busy)],
                          env, 120)
            if out.get("mode") != var.mode:
                raise BenchError(f"apply {var.key}: mode {out.get('mode')}, expected {var.mode}")
            if var.busy and (out.get("busy_wrong") != "0" or int(out.get("busy_calls", 0)) <= 0):
                raise BenchError(f"apply {var.key}: the busy thread saw wrong results: {out}")
            var.results.append(out)
        log(f"  apply round {r + 1}/{s.apply_rounds}: " +
            " ".join(f"{v.key}={float(v.results[-1]['apply_us_med']):.1f}us" for v in variants))
    return variants


# ---- macro ---------------------------------------------------------------------------


@dataclass
class MacroVariant:
    key: str
    label: str
    binary: Path
    mode: str | None           # None: the plain build, no shim
    patch: Path | None
    rps: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU time per request
    cpu_ratio: list[float] = field(default_factory=list)


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def server_sources() -> Path | None:
    d = paths.examples_dir() / "server"
    return d if (d / "server.c").is_file() and (d / "parser.c").is_file() else None


def build_macro(b: build.Builder, server_dir: Path) -> tuple[list[MacroVariant], Path]:
    srcs = [server_dir / "server.c", server_dir / "parser.c"]
    inc = [f"-I{server_dir}"]
    plain = b.plain(srcs, "server_plain", inc)
    inst = b.instrumented(srcs, "server", inc)
    fix = b.patch(inst, server_dir / "patches" / "fix_parse.c", "server", inc)
    loadgen = b.plain([MACRO / "loadgen.c"], "loadgen")
    return [
        MacroVariant("plain", "uninstrumented (gcc -O2)", plain, None, None),
        MacroVariant("jump", "instrumented, jump mode", inst, "jump", None),
        MacroVariant("dispatch", "instrumented, dispatch mode", inst, "dispatch", None),
        MacroVariant("jump_patched", "jump mode, fix_parse applied", inst, "jump", fix),
        MacroVariant("dispatch_patched", "dispatch mode, fix_parse applied", inst, "dispatch",
                     fix),
    ], loadgen


def start_server(var: MacroVariant, runtime: Path) -> tuple[subprocess.Popen[str], int]:
    env = clean_env({"FENTRY_MODE": var.mode} if var.mode else {}, runtime)
    proc = subprocess.Popen([str(var.binary), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "listening on 127.0.0.1:PORT"; EOF if it died
    m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        stop_server(proc)
        raise BenchError(f"server {var.key} did not start: {line!r} {proc.stderr.read()}")
    return proc, int(m.group(1))


def stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_channel(pid: int, deadline: float) -> dict:
    while True:
        try:
            return control.status(pid)
        except FentryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def run_macro(variants: list[MacroVariant], loadgen: Path, s: Settings, runtime: Path) -> None:
    for r in range(s.macro_rounds):
        got: dict[str, float] = {}
        for var in rotate(variants, r):
            proc, port = start_server(var, runtime)
            try:
                if var.mode:
                    st = wait_for_channel(proc.pid, time.monotonic() + 10)
                    if st["mode"] != var.mode:
                        raise BenchError(f"macro {var.key}: server in {st['mode']} mode")
                    if var.patch:
                        control.apply(proc.pid, var.patch)  # live, through the control socket
                cpu0 = cpu_ns(proc.pid)
                out = execute([str(loadgen), str(port), str(s.macro_conns), str(s.macro_seconds),
                               str(s.macro_max_requests), str(s.macro_depth),
                               "patched" if var.patch else "original"],
                              clean_env({}, runtime), timeout=s.macro_seconds + 30)
                cpu1 = cpu_ns(proc.pid)
            finally:
                stop_server(proc)
            if proc.returncode != 0:
                raise BenchError(f"macro {var.key}: server exited {proc.returncode}")
            var.rps.append(float(out["rps"]))
            var.cpu_us.append((cpu1 - cpu0) / 1000 / max(int(out["requests"]) + 1, 1))
            got[var.key] = float(out["rps"])
        plain = next(v for v in variants if v.key == "plain")
        for var in variants:
            var.ratio.append(got[var.key] / got["plain"])
            var.cpu_ratio.append(var.cpu_us[-1] / plain.cpu_us[-1])
        log(f"  macro round {r + 1}/{s.macro_rounds}: " +
            " ".join(f"{k}={v:.0f}/s" for k, v in got.items()))


# ---- scaling --------------------------------------------------------------------------


def run_scaling(b: build.Builder, scale: harness.Scale, runtime: Path,
                args: argparse.Namespace) -> list[harness.Row]:
    ctx = harness.Context(scale, Programs(b), runtime, args.quick, log=log)
    keys = [k for k in args.rows.split(",") if k] if args.rows else None
    log(f"scaling: N = {scale.n:,}, K up to {max(scale.ks):,}, {scale.rounds} rounds")
    return harness.run_rows(ctx, keys)


# ---- the machine ---------------------------------------------------------------------


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.splitlines()[0] if out else "not installed"


def machine() -> dict[str, str]:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    return {
        "CPU": (model.group(1) if model else "unknown") + (f" ({mhz.group(1)} MHz)" if mhz else "")
        + (", virtual machine" if flags and "hypervisor" in flags.group(1).split() else ""),
        "cores": f"{os.cpu_count()} online ({len(os.sched_getaffinity(0))} usable by this run)",
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "gcc": first_line(["gcc", "--version"]),
        "clang": first_line(["clang", "--version"]) if build.clang() else "not installed",
        "glibc": " ".join(platform.libc_ver()),
        "Python": platform.python_version(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def scaling_run(started: str, t0: float, load0: str) -> str:
    """The scaling section's line on its run: when, how long, the load before and after."""
    return (f"Run: {started}, {(time.monotonic() - t0) / 60:.1f} minutes. Load average "
            f"before / after: {load0} / {loadavg()}.")


# ---- the report ----------------------------------------------------------------------


@dataclass
class Target:
    what: str
    limit: str
    measured: str
    met: bool


def fmt_range(xs: list[float], digits: int = 2) -> str:
    return f"{min(xs):.{digits}f}–{max(xs):.{digits}f}"


def targets(micro: dict[str, MicroVariant], apply: dict[str, ApplyVariant],
            big_n: int) -> list[Target]:
    def ratio(key: str, to_direct: bool = False) -> float:
        v = micro[key]
        return median(v.ratio_direct if to_direct else v.ratio)

    t = [
        Target("jump, unpatched", "≤ 1.05× uninstrumented",
               f"{ratio('jump_unpatched'):.2f}×", ratio("jump_unpatched") <= 1.05),
        Target("jump, patched", "≤ 1.35× direct call of the replacement",
               f"{ratio('jump_patched', True):.2f}×", ratio("jump_patched", True) <= 1.35),
        Target("dispatch, unpatched", "≤ 1.6× uninstrumented",
               f"{ratio('dispatch_unpatched'):.2f}× (floor, `ret` only: "
               f"{ratio('dispatch_floor'):.2f}×)", ratio("dispatch_unpatched") <= 1.6),
        Target("dispatch, active-table miss", "≤ 2.0× uninstrumented",
               f"{ratio('dispatch_miss'):.2f}× (floor, one branch: "
               f"{ratio('dispatch_branch_floor'):.2f}×)", ratio("dispatch_miss") <= 2.0),
    ]
    for mode, limit in (("jump", 50.0), ("dispatch", 5.0)):
        idle, busy = apply[f"{mode}_idle"], apply[f"{mode}_busy"]
        a = idle.med("apply_us_med")
        big = apply[f"{mode}_many"].med("apply_us_med")
        t.append(Target(f"in-process apply, {mode} mode", f"≤ {limit:g} µs",
                        f"{a:.1f} µs idle (busy program: {busy.med('apply_us_med'):.1f} µs; "
                        f"program with {big_n:,} more functions: {big:.1f} µs)",
                        a <= limit))
    return t


def analysis(micro: dict[str, MicroVariant], apply: dict[str, ApplyVariant],
             tlist: list[Target], mhz: float | None) -> list[str]:
    """Why each target that is not met is not: the measured parts, and what would help."""
    out: list[str] = []
    cyc = (lambda ns: f" ≈ {ns * mhz / 1000:.1f} cycles at {mhz:.0f} MHz") if mhz else (lambda ns: "")
    plain = median(micro["plain"].ns)
    direct = median(micro["direct"].ns)
    missed = {t.what for t in tlist if not t.met}

    if "jump, unpatched" in missed:
        extra = median(micro["jump_unpatched"].ns) - plain
        out.append(
            f"- **jump, unpatched** costs {extra:+.2f} ns per call{cyc(extra)} over the plain "
            "build. The site is a 6-byte `test` (`67 a9 fd …`) that is still fetched, "
            "decoded and retired: tiny() is `lea; ret`, so it adds half again to its "
            "instructions. On a function that does any work it disappears in the noise (see "
            "the macro benchmark); nothing cheaper can sit at the site short of removing the "
            "instruction, which would need the compiler's cooperation.")
    if "jump, patched" in missed:
        extra = median(micro["jump_patched"].ns) - direct
        so = median(micro["jump_patched"].ns) / median(micro["direct_so"].ns)
        out.append(
            f"- **jump, patched** costs {extra:+.2f} ns per call{cyc(extra)} over a direct call "
            "of the same code. A patched site is `jmp rel32` (`67 e9 fd …`): straight to the "
            "replacement when the patch was loaded within 2 GiB of the program and its "
            "replacement placed at the residue its site reaches (one taken branch: the site "
            "forms table's `near`), else through a trampoline (`near2`: two direct jumps; "
            "`tramp`: a jump and an indirect jump). This run's patched call is "
            f"{so:.2f}× a call into a shared library through the PLT; `fentry-build status` "
            "of the benchmark's process says why its patch was not near (`far_reason`).")
    if "dispatch, unpatched" in missed:
        extra = median(micro["dispatch_unpatched"].ns) - plain
        out.append(
            f"- **dispatch, unpatched** costs {extra:+.2f} ns per call{cyc(extra)}: a `call` "
            "and a `ret` to `__fentry__` plus `mov table(%rip),%r11; test; jnz` on every "
            "instrumented call. The call and return pair is the cost: a `__fentry__` that is "
            f"only `ret` (no shim) costs {median(micro['dispatch_floor'].ratio):.2f}× in the same "
            "run, so the target is below this machine's floor; dispatch mode cannot avoid "
            "the pair because it never rewrites the site. Jump mode is the mode for speed.")
    if "dispatch, active-table miss" in missed:
        extra = median(micro["dispatch_miss"].ns) - median(micro["dispatch_unpatched"].ns)
        out.append(
            f"- **dispatch, active-table miss** costs {extra:+.2f} ns per call{cyc(extra)} over "
            "the unpatched dispatch call: the quick miss (entry.S) keeps rax in the red zone, "
            "reads the sequence number, multiplies the key (the return address, just stored by "
            "the call) by the hash's constant, loads the home slot, reads the sequence number "
            "again. Merely taking the branch to a second `ret` while a table is active costs "
            f"{median(micro['dispatch_branch_floor'].ratio):.2f}× (no shim, same run): the "
            "hash's multiply and the slot load on the return address's dependency chain are "
            "the rest. A cheaper hash (a shift) measured about 0.35 ns less outside this "
            "suite, but clusters neighbouring functions (tests/test_dispatch.py).")
    for mode, limit in (("jump", 50.0), ("dispatch", 5.0)):
        a = apply[f"{mode}_idle"].med("apply_us_med")
        others = [(what, apply[key].med("apply_us_med"))
                  for key, what in ((f"{mode}_busy", "with a busy thread"),
                                    (f"{mode}_many", "in the larger program"))]
        over = [f"{what} ({us:.1f} µs)" for what, us in others if us > limit]
        if f"in-process apply, {mode} mode" in missed:
            out.append(f"- **apply, {mode} mode**: {a:.1f} µs against {limit:g} µs; where the "
                       "time goes is below.")
        elif over:
            out.append(f"- **apply, {mode} mode** is met for the small idle program the target "
                       f"names, but not {' or '.join(over)}; where the time goes is below.")
    return out


def apply_breakdown(apply: dict[str, ApplyVariant], s: Settings) -> list[str]:
    """What one apply is made of, from the parts measured alone."""
    out = []
    idle, busy, many = apply["jump_idle"], apply["jump_busy"], apply["jump_many"]
    a, b, big = (v.med("apply_us_med") for v in (idle, busy, many))
    mb_i, mb_b = idle.med("membarrier_us_med"), busy.med("membarrier_us_med")
    pw, pw_b = idle.med("pwrite_us_med"), busy.med("pwrite_us_med")
    oc, oc_b = idle.med("open_check_us_med"), busy.med("open_check_us_med")
    parts, parts_b = 3 * mb_i + 3 * pw + oc, 3 * mb_b + 3 * pw_b + oc_b
    out.append(
        f"- **Jump mode** ({a:.1f} µs idle, {b:.1f} µs with a busy thread): the loader opens "
        f"and fstat()s the patch file ({oc:.1f} µs), then poke.c writes the site: one "
        "unpatched site alone takes two `pwrite`s to /proc/self/mem (the tail, then the "
        f"opcode: {pw:.2f} µs each) and two `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)` "
        f"({mb_i:.2f} µs each idle, {mb_b:.2f} µs each while another thread of the process "
        "runs, whose core must be interrupted); a revert, one of each. The parts (with the "
        "three of the first protocol, for comparison) add up to "
        f"{parts:.1f} µs idle and {parts_b:.1f} µs busy; the rest is the loader's own work. "
        f"In a program with {s.many_functions:,} more functions the same apply takes "
        f"{big:.1f} µs ({big - a:+.1f} µs, {1000 * (big - a) / s.many_functions:.2f} µs per "
        "1000 functions): fentry_activate() visits only the sites of the old and the new "
        "redirect sets, so the size of the program hardly matters.")
    d, dbig = apply["dispatch_idle"], apply["dispatch_many"]
    da = d.med("apply_us_med")
    out.append(
        f"- **Dispatch mode** ({da:.1f} µs idle; {dbig.med('apply_us_med'):.1f} µs in the "
        "large program). Nearly all of it is the kernel's: open + fstat + close of the patch "
        f"file, measured alone, takes {d.med('open_check_us_med'):.1f} µs on this machine; "
        "the loader's own work (lock, find, building and publishing the table) is the small "
        "remainder. "
        "Revert does not open a file: "
        f"{d.med('revert_us_med'):.2f} µs. The file check cannot be skipped on a re-apply "
        "(the file may have been rebuilt: its identity is what is checked).")
    return out


def shim_changes(micro: dict[str, MicroVariant], apply: dict[str, ApplyVariant],
                 s: Settings) -> list[str]:
    """Changes to the shim the numbers point at, each with the figure behind it."""
    out = []
    if "form_local" in micro:
        def rel(key: str) -> float:
            return median([a / b for a, b in zip(micro[key].ns, micro["form_local"].ns)])
        out.append(
            "- **Done after the first run of this suite**: the first core sync of a rewrite "
            "is skipped when no trampoline was written; fentry_activate() visits only the "
            "sites that can change. Tried and given up for uprobe safety: patched 6-byte "
            "sites jumping through the trampoline's target word (`ff 25`, site forms table: "
            f"{rel('form_tramp'):.2f}× → {rel('form_mem'):.2f}× a direct call).")
    miss = median(micro["dispatch_miss"].ns) - median(micro["dispatch_unpatched"].ns)
    out.append(
        "- **Done: entry.S, the active-table miss** (paid by every instrumented call of the "
        "program while any patch is active in dispatch mode; here "
        f"{miss:+.2f} ns per call over the unpatched dispatch call): a miss whose home slot "
        "is empty is answered with rax alone (kept in the red zone) instead of three pushed "
        "registers; the hash is multiplicative (table_layout.h), so neighbouring functions "
        "no longer cluster. Hits, collisions and tables being rewritten take the full "
        "lookup.")
    return out


def write_results(path: Path, command: str, mach: dict[str, str], s: Settings, quick: bool,
                  micro: list[MicroVariant], apply: list[ApplyVariant],
                  macro: list[MacroVariant] | None, macro_note: str, xray_note: str,
                  started: str, seconds: float, load: tuple[str, str],
                  scaling: list[str]) -> None:
    m = {v.key: v for v in micro}
    a = {v.key: v for v in apply}
    mhz_m = re.search(r"\(([\d.]+) MHz\)", mach["CPU"])
    tl = targets(m, a, s.many_functions)
    L: list[str] = []
    L += ["# fentry_build benchmark results", ""]
    if quick:
        L += ["**Smoke run (`--quick`): tiny counts, one round. These numbers check that every "
              "variant works; they are not measurements.**", ""]
    L += [f"Command (from the repository root): `{command}`  ", f"Run: {started}, "
          f"{seconds / 60:.1f} minutes. Load average before / after: {load[0]} / {load[1]}.", ""]
    L += ["## Machine", ""] + [f"- {k}: {v}" for k, v in mach.items()] + [""]
    L += ["## Method", "",
          f"- Micro: `tiny()` (`lea 1(%rdi,%rdi,2),%rax; ret`, in its own translation unit) "
          f"called {s.micro_calls:,} times in a loop, one process per measurement. The loop "
          "runs in 10 chunks, each timed with the thread's CPU time "
          "(`CLOCK_THREAD_CPUTIME_ID`), and a process's figure is its fastest chunk: this "
          "2-core VM is shared with other work, and a chunk slowed by an interrupt, another "
          "process or the hypervisor says nothing about the call (the wall clock over all "
          f"calls is in the table too). {s.micro_rounds} rounds, round-robin over the "
          "variants, each round starting one variant further on. A figure is the median over "
          "rounds; a ratio is the median of the per-round ratios to the uninstrumented build "
          "(or the direct call) of the same round, which cancels the machine's slow drifts.",
          "- Instrumented builds use the flags of `dependency('fentry')` (read from "
          "`shim/meson.build`), the shim linked in, and patches registered by the real "
          "generator (`python -m fentry_build.gen`); patches are applied in-process with "
          "`fentry_apply()` before the timed loop. Dispatch/jump is chosen by `FENTRY_MODE`.",
          f"- Apply: `fentry_apply()` then `fentry_revert()` of a one-function patch, "
          f"{s.apply_cycles} cycles per process, each call timed with `CLOCK_MONOTONIC`; the "
          "first apply (which also dlopens and validates) is reported apart. "
          f"{s.apply_rounds} rounds; medians of the per-process medians. 'busy': a second "
          "thread calls the patched function without pause meanwhile and checks every result.",
          f"- Macro: the example server ({macro_note}) on 127.0.0.1, {s.macro_conns} client "
          f"connections (= its worker threads), {s.macro_depth} `SUM 1 2 3 4 5 6 7` "
          f"per round trip, each answer checked, for {s.macro_seconds:g} s or "
          f"{s.macro_max_requests:,} requests; {s.macro_rounds} rounds round-robin. The patched "
          "variants get `fix_parse.so` through the control socket after start; a probe "
          "(`SUM` with 8 numbers) checks which `parse_request()` answers. Client and server "
          "share the 2 cores.",
          "- Nothing is pinned (two cores: a pinned benchmark would fight the other work).",
          ""]

    L += ["## Targets", "", "| target | limit | measured | met |", "|---|---|---|---|"]
    L += [f"| {t.what} | {t.limit} | {t.measured} | {'yes' if t.met else '**no**'} |" for t in tl]
    L += [""]

    L += ["## Micro benchmark: a tiny function, ns per call", "",
          "| variant | ns/call (median) | range over rounds | wall clock, all calls | "
          "ratio to uninstrumented | ratio to direct call |",
          "|---|---|---|---|---|---|"]
    for v in micro:
        if v.group == "main":
            L.append(f"| {v.label} | {median(v.ns):.2f} | {fmt_range(v.ns)} | "
                     f"{median(v.wall):.2f} | {median(v.ratio):.2f}× | "
                     f"{median(v.ratio_direct):.2f}× |")
    if xray_note:
        L += ["", xray_note]
    if "xray_unpatched" in m:
        def to_clang(key: str) -> float:
            return median([x / c for x, c in zip(m[key].ns, m["clang_plain"].ns)])
        xr, xp = to_clang("xray_unpatched"), to_clang("xray_patched")
        L += ["", f"XRay against its own compiler's plain build (clang -O2): unpatched "
              f"{xr:.2f}×, patched {xp:.2f}×. XRay's patched sled calls a handler (here one "
              "that counts tiny()'s entries) through a trampoline that saves every argument "
              "register, on entry and on exit; it observes calls, it does not replace the "
              "function, so its patched row is comparable to a hook, not to a patched call."]
    if "form_local" in m:
        local = m["form_local"]
        L += ["", "### What the bytes of a patched site cost (siteforms.c)", "",
              "The same tiny function, not instrumented, its entry a 6-byte NOP that is "
              "rewritten once before the loop into each form a jump-mode site could take "
              "(the replacement's code being in the program, or in a shared library as a "
              "patch .so is); ratio to the direct call of the same round.", "",
              "| site form | ns/call (median) | range over rounds | ratio to direct call |",
              "|---|---|---|---|"]
        for v in micro:
            if v.group == "forms":
                r = median([a / b for a, b in zip(v.ns, local.ns)])
                L.append(f"| {v.label} | {median(v.ns):.2f} | {fmt_range(v.ns)} | {r:.2f}× |")
    L += [""]

    L += ["## Apply latency, in-process (µs)", "",
          "| mode, program | apply (median) | apply p90 | revert (median) | first apply "
          "(dlopen + validate) | membarrier SYNC_CORE | pwrite /proc/self/mem | open + fstat |",
          "|---|---|---|---|---|---|---|---|"]
    for v in apply:
        L.append(f"| {v.label} | {v.med('apply_us_med'):.1f} | {v.med('apply_us_p90'):.1f} | "
                 f"{v.med('revert_us_med'):.1f} | {v.med('first_apply_us'):.0f} | "
                 f"{v.med('membarrier_us_med'):.2f} | {v.med('pwrite_us_med'):.2f} | "
                 f"{v.med('open_check_us_med'):.2f} |")
    L += ["", "membarrier, pwrite and open + fstat are measured alone in the same process "
          "after the cycles (the membarrier and pwrite columns of dispatch mode show what the "
          "parts would cost there; dispatch mode itself uses neither).", ""]

    L += ["## Macro benchmark: the example server, requests/s", ""]
    if macro:
        L += ["| variant | requests/s (median) | range over rounds | ratio to uninstrumented "
              "| server CPU µs per request (median) | range over rounds | CPU ratio to "
              "uninstrumented |",
              "|---|---|---|---|---|---|---|"]
        for v in macro:
            L.append(f"| {v.label} | {median(v.rps):,.0f} | {fmt_range(v.rps, 0)} | "
                     f"{median(v.ratio):.3f}× | {median(v.cpu_us):.2f} | "
                     f"{fmt_range(v.cpu_us)} | {median(v.cpu_ratio):.3f}× |")
        L += ["", "Requests/s is what a client sees, with client and server on the same two "
              "cores beside whatever else runs; the server's CPU time per request (all its "
              "threads, from /proc/PID/task/*/schedstat, over the load only: the probe "
              "request is counted in) is its cost, less disturbed by the rest of the machine. "
              "Ratios are medians of per-round ratios."]
        spread = max(max(v.rps) / min(v.rps) for v in macro)
        if spread > 1.5:
            L += ["", f"**In this run requests/s varied up to {spread:.1f}× between rounds of "
                  "the same variant**: the other work on the machine (see the load average "
                  "above), not the build, decided it, so its ratios say nothing about "
                  "instrumentation. Read the CPU-time columns."]
        base = next(v for v in macro if v.key == "plain")
        noise = max(base.cpu_us) / min(base.cpu_us)
        L += ["", f"The uninstrumented server's own CPU µs per request varied {noise:.2f}× "
              "between rounds, so CPU ratios closer to 1 than that spread are not resolved "
              "here. The micro benchmark bounds the real cost: a request runs a handful of "
              "instrumented function entries (`wait_for`, `answer`, `parse_request`; gcc "
              "inlined the other helpers), each costing about 1 ns at most unpatched "
              "(dispatch mode; jump mode's NOP less), against about "
              f"{median(base.cpu_us):.0f} µs of CPU per request, most of it in the kernel's "
              "socket code: far below 1%."]
    else:
        L += [macro_note]
    L += [""]

    why = analysis(m, a, tl, float(mhz_m.group(1)) if mhz_m else None)
    L += ["## Targets not met: why", ""]
    L += why if why else ["Every target is met."]
    L += ["", "## Where the apply time goes", ""] + apply_breakdown(a, s)
    L += ["", "## What would make the shim faster", ""] + shim_changes(m, a, s)
    L += [""] + scaling + [""]
    text = "\n".join(L)
    # --no-scaling: the report's scaling section, and what was written by hand after it,
    # stay as they are.
    old = path.read_text() if path.exists() else ""
    if not scaling and harness.BEGIN in old:
        text = text.rstrip("\n") + "\n\n" + harness.BEGIN + old.split(harness.BEGIN, 1)[1]
    path.write_text(text)


# ---- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: every variant once with tiny counts (correctness only)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where to write the report (default benchmarks/RESULTS.md; "
                         "--quick writes none unless given)")
    ap.add_argument("--work", type=Path, default=None,
                    help="build and run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=None, help="override the micro rounds")
    ap.add_argument("--no-xray", action="store_true", help="skip the LLVM XRay rows")
    ap.add_argument("--scaling-only", action="store_true",
                    help="only the scaling section; it replaces the one in the report")
    ap.add_argument("--no-scaling", action="store_true",
                    help="skip the scaling section (the report keeps the one it has)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated keys of the scaling rows to run (default: all)")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.rounds:
        s = Settings(**{**s.__dict__, "micro_rounds": args.rounds})
    results = args.results or (None if args.quick else HERE / "RESULTS.md")
    command = shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None
                                                          else sys.argv[1:])])
    started = now()
    t0 = time.monotonic()
    load0 = loadavg()

    work = args.work or Path(tempfile.mkdtemp(prefix="fentry-bench-"))
    runtime = work / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    scale = harness.QUICK if args.quick else harness.FULL
    scaling: list[str] = []
    try:
        log(f"building in {work}")
        b = build.Builder(work / "build")
        if args.scaling_only:
            rows = run_scaling(b, scale, runtime, args)
            section = harness.section(rows, scale, command, args.quick,
                                      scaling_run(started, t0, load0))
            log(f"every scaling row ran and checked its result "
                f"({time.monotonic() - t0:.0f} s)")
            if results:
                harness.splice(results, section)
                log(f"wrote the scaling section of {results}")
            return 0
        with_clang = build.clang() is not None and not args.no_xray
        xray_note = ""
        if args.no_xray:
            xray_note = "LLVM XRay rows skipped (--no-xray)."
        elif not with_clang:
            xray_note = ("clang is not installed, so the LLVM XRay rows are skipped "
                         "(Debian: `apt-get install clang`).")
        try:
            micro = build_micro(b, with_clang, runtime)
        except build.BuildError as e:
            if not with_clang or "clang" not in str(e):
                raise
            log(f"XRay build failed, skipping its rows: {e}")
            xray_note = f"clang is installed but could not build the XRay program: {e}"
            micro = build_micro(b, False, runtime)
        apply_variants = build_apply(b, s)
        server_dir = server_sources()
        macro: list[MacroVariant] | None = None
        if server_dir:
            macro, loadgen = build_macro(b, server_dir)
            macro_note = f"`examples/server`, built from {server_dir}"
        else:
            macro_note = "examples/server was not found, so the macro benchmark did not run"

        log(f"micro: {len(micro)} variants x {s.micro_rounds} rounds")
        run_micro(micro, s)
        log(f"apply: {len(apply_variants)} variants x {s.apply_rounds} rounds")
        apply = run_apply(apply_variants, s, runtime)
        if macro:
            log(f"macro: {len(macro)} variants x {s.macro_rounds} rounds")
            run_macro(macro, loadgen, s, runtime)
        if not args.no_scaling:
            s0, l0, when = time.monotonic(), loadavg(), now()
            scaling = harness.section(run_scaling(b, scale, runtime, args), scale, command,
                                      args.quick, scaling_run(when, s0, l0))
    except (BenchError, harness.BenchError, build.BuildError, FentryError) as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    elapsed = time.monotonic() - t0
    for v in micro:
        log(f"micro {v.key}: {median(v.ns):.2f} ns/call, {median(v.ratio):.2f}x plain, "
            f"{median(v.ratio_direct):.2f}x direct")
    for v in apply:
        log(f"apply {v.key}: apply {v.med('apply_us_med'):.1f} us, "
            f"revert {v.med('revert_us_med'):.1f} us")
    for v in macro or []:
        log(f"macro {v.key}: {median(v.rps):.0f} requests/s, {median(v.ratio):.3f}x plain, "
            f"{median(v.cpu_us):.2f} CPU us/request, {median(v.cpu_ratio):.3f}x plain")
    log(f"every variant ran and checked its result ({elapsed:.0f} s)")
    if results:
        write_results(results, command, machine(), s, args.quick, micro, apply, macro,
                      macro_note, xray_note, started, elapsed, (load0, loadavg()), scaling)
        log(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
