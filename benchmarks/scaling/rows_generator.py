"""rows_generator.py - what the patch generator costs for big programs and big patches.

Targets from the issue "Performance at scale" (16): the generator (``python -m
fentry_build.gen``, run by the build for every patch) linear in N + K: K = 10,000
replaced functions of a program of N = 10,000 in ≤ 10 s, K = 1,000 of N = 50,000 in ≤ 5 s.

Each figure is the CPU time (user + system, the generator and what it starts, from
wait4()) of one generator run, as the build runs it (benchmarks/build.py); the same run
with a tenth of the functions replaced, in the same rounds, shows how it grows with K.
The registration of the first run is linked into a patch and loaded by the program, which
must then run the replacement of exactly K functions.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import BenchError, Context, Result, row

import build  # benchmarks/build.py

MAX_ROUNDS = 3  # a run takes minutes when the generator is slow; CPU time varies little


def generator_cpu(prog: Path, src: Path, reg: Path) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one generator run writing `reg`."""
    cmd = build.generator_command(prog, src, reg)
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=build.generator_env(), stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}:\n"
                             f"{out.read().decode(errors='replace')}")
    return usage.ru_utime + usage.ru_stime, wall


def check_patch(ctx: Context, prog: Path, src: Path, reg: Path, k: int) -> None:
    """The registration works: linked with its patch and loaded, exactly K functions of the
    program run their replacement, and none gives a wrong result."""
    so = ctx.programs.b.link_patch(src, reg, reg.parent / f"{src.stem}.so")
    out = ctx.run([prog, "calls", "1", so], mode="dispatch")
    if out.get("wrong") != "0" or int(out.get("patched_seen", -1)) != k:
        raise BenchError(f"{prog} calls 1 {so}: {out} (expected {k} functions patched)")


def generator_row(ctx: Context, n: int, k: int, limit_s: float) -> Result:
    prog = ctx.programs.program(n, "fentry")
    small = max(1, k // 10)
    sizes = {"K": k, "K/10": small}
    srcs = {key: ctx.programs.patch_source(prog, n, kk) for key, kk in sizes.items()}
    out = srcs["K"].parent / "timed"  # apart from the patches other rows build
    out.mkdir(exist_ok=True)
    regs = {key: out / f"{src.stem}.reg.c" for key, src in srcs.items()}
    walls: dict[str, list[float]] = {key: [] for key in sizes}

    def measure(key: str) -> float:
        cpu, wall = generator_cpu(prog, srcs[key], regs[key])
        ctx.log(f"    generator N = {n:,}, K = {sizes[key]:,}: {cpu:.2f} s CPU, {wall:.2f} s wall")
        if not walls[key]:  # the first run of each size: its output is a working patch
            check_patch(ctx, prog, srcs[key], regs[key], sizes[key])
        walls[key].append(wall)
        return cpu

    rounds = ctx.interleave({key: lambda key=key: measure(key) for key in sizes},
                            rounds=min(ctx.rounds, MAX_ROUNDS))
    t = ctx.median_of(rounds, lambda r: r["K"])
    t10 = ctx.median_of(rounds, lambda r: r["K/10"])
    wall = statistics.median(walls["K"])
    per_fn = (t - t10) / (k - small) * 1e3 if k > small else 0.0
    return Result(f"N = {n:,}, K = {k:,}: {t:.2f} s CPU ({wall:.2f} s wall); "
                  f"K = {small:,}: {t10:.2f} s ({t / t10:.1f}× for {k // small}× the functions)",
                  t <= limit_s,
                  f"`python -m fentry_build.gen` on a patch replacing K = {k:,} adjacent "
                  f"functions of a program of N = {n:,}, and on one replacing {small:,}, "
                  f"interleaved, {len(rounds)} rounds, CPU time from wait4() (the generator and "
                  f"what it starts); {per_fn:.2f} ms CPU per further replaced function.  Each "
                  "size's registration was linked and loaded: exactly K functions ran the "
                  "replacement.")


@row("generator_10k", "generator (`python -m fentry_build.gen`), K = 10,000 replaced functions "
     "in a program of N = 10,000", "≤ 10 s CPU, linear in K")
def generator_10k(ctx: Context) -> Result:
    n = ctx.n // 5  # 10,000 at full scale
    return generator_row(ctx, n, n, 10.0)


@row("generator_50k", "generator, K = 1,000 replaced functions in a program of N = 50,000",
     "≤ 5 s CPU")
def generator_50k(ctx: Context) -> Result:
    return generator_row(ctx, ctx.n, max(1, ctx.n // 50), 5.0)
