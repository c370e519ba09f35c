"""rows_runtime.py - what the shim costs at scale: start-up, memory, live apply, dispatch.

Targets from the issues "Performance at scale" (16) and "Big programs, big patches, many
processes" (18).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

from harness import BenchError, Context, Result, row


def start_cost(ctx: Context, prog: Path, mode: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `prog start`: fork, exec, the shim's start-up, exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(prog), "start"], env=ctx.env(mode), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0 or err:
        raise BenchError(f"{prog} start exited {proc.returncode}: {err!r}")
    return wall, usage.ru_utime + usage.ru_stime


def startup_row(ctx: Context, flavour: str, limit_s: float) -> Result:
    plain = ctx.programs.program(ctx.n, "plain")
    inst = ctx.programs.program(ctx.n, flavour)
    ctx.run([inst, "calls", "1"], mode="jump")  # it does run in jump mode
    rounds = ctx.interleave({
        "plain": lambda: start_cost(ctx, plain, None)[0],
        "jump": lambda: start_cost(ctx, inst, "jump")[0],
        "plain_cpu": lambda: start_cost(ctx, plain, None)[1],
        "jump_cpu": lambda: start_cost(ctx, inst, "jump")[1],
    })
    d = ctx.median_of(rounds, lambda r: r["jump"] - r["plain"])
    dc = ctx.median_of(rounds, lambda r: r["jump_cpu"] - r["plain_cpu"])
    base = ctx.median_of(rounds, lambda r: r["plain"])
    return Result(f"plain + {d * 1e3:.1f} ms (plain {base * 1e3:.1f} ms; CPU +{dc * 1e3:.1f} ms)",
                  d <= limit_s,
                  f"N = {ctx.n:,}: `scale start` timed from fork to exit, plain build and "
                  f"instrumented build ({flavour}) in jump mode, interleaved; CPU time from "
                  "wait4().")


@row("startup_runtime", "start-up of an instrumented program of N functions, jump mode, "
     "sites readied at start (-Dfentry:sites=runtime)", "≤ plain + 5 ms (wall)")
def startup_runtime(ctx: Context) -> Result:
    return startup_row(ctx, "fentry", 0.005)


@row("startup_prepared", "start-up of an instrumented program of N functions, jump mode, "
     "sites prepared at build time (the default)", "≤ plain + 2 ms (wall)")
def startup_prepared(ctx: Context) -> Result:
    return startup_row(ctx, "prepared", 0.002)


def anonymous_kib(pid: int) -> int:
    """The memory the process keeps for itself: its anonymous pages (heap, stacks, .bss, and
    every page of a file mapping it wrote: a private copy).  Not Private_Dirty: that also
    counts page cache not yet written back of a file only this process maps (a program
    linked moments ago), which is the kernel's, not the process's."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise BenchError(f"no Anonymous in /proc/{pid}/smaps_rollup")


def idle_anonymous(ctx: Context, prog: Path, mode: str | None) -> float:
    proc = subprocess.Popen([str(prog), "idle"], env=ctx.env(mode), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready=1" not in line or (mode and f"mode={mode}" not in line):
            raise BenchError(f"{prog} idle: {line!r}")
        return float(anonymous_kib(proc.pid))
    finally:
        proc.communicate(timeout=30)


@row("memory_idle_runtime", "anonymous (private) memory of an idle instrumented process of N "
     "functions, jump mode, nothing patched, sites readied at start (/proc/PID/smaps_rollup)",
     "(the prepared row's reference)")
def memory_idle_runtime(ctx: Context) -> Result:
    r = memory_row(ctx, "fentry")
    return Result(r.now, None, r.detail)


@row("memory_idle_prepared", "anonymous (private) memory of an idle instrumented process of N "
     "functions, jump mode, nothing patched, sites prepared at build time "
     "(/proc/PID/smaps_rollup)", "≤ 1.10× plain")
def memory_idle_prepared(ctx: Context) -> Result:
    return memory_row(ctx, "prepared")


def memory_row(ctx: Context, flavour: str) -> Result:
    plain = ctx.programs.program(ctx.n, "plain")
    inst = ctx.programs.program(ctx.n, flavour)
    rounds = ctx.interleave({"plain": lambda: idle_anonymous(ctx, plain, None),
                             "jump": lambda: idle_anonymous(ctx, inst, "jump")})
    ratio = ctx.median_of(rounds, lambda r: r["jump"] / r["plain"])
    kib = ctx.median_of(rounds, lambda r: r["jump"])
    base = ctx.median_of(rounds, lambda r: r["plain"])
    return Result(f"{ratio:.2f}× ({kib / 1024:.1f} MiB vs {base / 1024:.1f} MiB)", ratio <= 1.10,
                  f"N = {ctx.n:,}; each process started, read once it printed `ready`, "
                  "then stopped.")


def apply_row(ctx: Context, k: int, limit_us: float) -> Result:
    prog = ctx.programs.program(ctx.n, "prepared")  # the default build
    patch = ctx.programs.patch(prog, ctx.n, k, "adjacent")
    cycles = ctx.scale.apply_cycles
    jump_runs: list[dict[str, str]] = []

    def jump() -> float:
        jump_runs.append(ctx.run([prog, "apply", patch, cycles], mode="jump"))
        return float(jump_runs[-1]["apply_us_med"])

    rounds = ctx.interleave({
        "jump": jump,
        "dispatch": lambda: float(ctx.run([prog, "apply", patch, cycles],
                                          mode="dispatch")["apply_us_med"]),
    })

    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in jump_runs)

    b, rb, rv = med("apply_batch_us_med"), med("revert_batch_us_med"), med("revert_us_med")
    a = ctx.median_of(rounds, lambda r: r["jump"])
    d = ctx.median_of(rounds, lambda r: r["dispatch"])
    return Result(f"K = {k:,}: sites {b:,.1f} µs (revert {rb:,.1f} µs); whole apply {a:,.1f} µs "
                  f"(revert {rv:,.1f} µs; dispatch mode {d:,.1f} µs)",
                  b <= limit_us,
                  f"`fentry_apply()` of a reverted K-function patch (adjacent functions) in an "
                  f"idle program of N = {ctx.n:,} (sites prepared at build time), median of "
                  f"{cycles} apply/revert cycles per process. \"sites\": the shim's code "
                  "rewriting (fentry_poke_batch(), timed by the shim) - what batching changes; "
                  "the whole apply adds the loader's work (the file's check, its private copy, "
                  "validation), measured in dispatch mode too.")


@row("apply_jump_one", "live apply, jump mode, one function", "≤ 20 µs")
def apply_jump_one(ctx: Context) -> Result:
    return apply_row(ctx, ctx.scale.ks[0], 20)


@row("apply_jump_100", "live apply, jump mode, K = 100 functions (batched)", "≤ 150 µs")
def apply_jump_100(ctx: Context) -> Result:
    return apply_row(ctx, ctx.scale.ks[1] if ctx.quick else 100, 150)


@row("apply_jump_10k", "live apply, jump mode, K = 10,000 functions (batched)", "≤ 10 ms")
def apply_jump_10k(ctx: Context) -> Result:
    return apply_row(ctx, ctx.scale.ks[-1], 10_000)


def calls_ns(ctx: Context, prog: Path, mode: str | None, patches: list[Path],
             expect_patched: int) -> float:
    out = ctx.run([prog, "calls", ctx.scale.calls_rounds, *patches], mode=mode)
    if out.get("wrong") != "0" or int(out.get("patched_seen", -1)) != expect_patched:
        raise BenchError(f"{prog} calls: {out} (expected {expect_patched} patched)")
    return float(out["ns_per_call"])


@row("dispatch_miss", "dispatch mode, a program calling all N functions while K are patched "
     "(adjacent, and spread for the largest K)", "≤ 2.0× plain for every K")
def dispatch_miss(ctx: Context) -> Result:
    plain = ctx.programs.program(ctx.n, "plain")
    inst = ctx.programs.program(ctx.n, "prepared")  # the default build: calls put back
    ks = [k for k in ctx.scale.ks if k <= ctx.n]
    variants = {"plain": lambda: calls_ns(ctx, plain, None, [], 0),
                "K=0": lambda: calls_ns(ctx, inst, "dispatch", [], 0)}
    for k in ks:
        p = ctx.programs.patch(inst, ctx.n, k, "adjacent")
        variants[f"K={k:,}"] = lambda p=p, k=k: calls_ns(ctx, inst, "dispatch", [p], k)
    big = ks[-1]
    sp = ctx.programs.patch(inst, ctx.n, big, "spread")
    variants[f"K={big:,} spread"] = lambda: calls_ns(ctx, inst, "dispatch", [sp], big)
    rounds = ctx.interleave(variants)
    ratios = {k: ctx.median_of(rounds, lambda r, k=k: r[k] / r["plain"])
              for k in variants if k != "plain"}
    return Result(", ".join(f"{k}: {v:.2f}×" for k, v in ratios.items()),
                  max(ratios.values()) <= 2.0,
                  f"`scale calls`: every one of N = {ctx.n:,} functions called "
                  f"{ctx.scale.calls_rounds} times through a table, ns per call (fastest of "
                  "10 chunks, thread CPU time), against the plain build in the same round; "
                  "K=0: instrumented, nothing patched.")


@row("jump_unpatched_calls", "jump mode, a program calling all N functions, nothing patched",
     "≤ 1.05× plain")
def jump_unpatched_calls(ctx: Context) -> Result:
    plain = ctx.programs.program(ctx.n, "plain")
    inst = ctx.programs.program(ctx.n, "prepared")
    rounds = ctx.interleave({"plain": lambda: calls_ns(ctx, plain, None, [], 0),
                             "jump": lambda: calls_ns(ctx, inst, "jump", [], 0)})
    ratio = ctx.median_of(rounds, lambda r: r["jump"] / r["plain"])
    return Result(f"{ratio:.2f}×", ratio <= 1.05,
                  "Every site is its unpatched form (`67 a9 fd …`, a `test`); the functions "
                  "are `lea; ret`, so the extra instruction is a large share of each call.")
