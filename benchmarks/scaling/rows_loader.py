"""rows_loader.py - what loading patches costs at scale: first apply, stacking, start-up.

Targets from the issue "Big programs, big patches, many processes" (18 §2): no quadratic
path in the loader.
"""

from __future__ import annotations

from pathlib import Path

from harness import BenchError, Context, Result, row


def first_apply_us(ctx: Context, prog: Path, patch: Path, mode: str) -> float:
    return float(ctx.run([prog, "apply", patch, 1], mode=mode)["first_apply_us"])


@row("first_apply_dispatch_10k", "first apply of a K-function patch, dispatch mode: the "
     "private copy and its SHA-256, dlopen, validation, one publish (and jump mode, which "
     "also writes the trampolines and sites)",
     "≤ 20 ms at K = 10,000; jump mode ≤ 30 ms (the 10 ms site-write target + 20 ms)")
def first_apply_dispatch(ctx: Context) -> Result:
    prog = ctx.programs.program(ctx.n, "fentry")
    k = ctx.scale.ks[-1]
    patch = ctx.programs.patch(prog, ctx.n, k, "adjacent")
    rounds = ctx.interleave({"dispatch": lambda: first_apply_us(ctx, prog, patch, "dispatch"),
                             "jump": lambda: first_apply_us(ctx, prog, patch, "jump")})
    d = ctx.median_of(rounds, lambda r: r["dispatch"]) / 1e3
    j = ctx.median_of(rounds, lambda r: r["jump"]) / 1e3
    size = patch.stat().st_size
    return Result(f"K = {k:,}: {d:.1f} ms (jump mode {j:.1f} ms)", d <= 20 and j <= 30,
                  f"`fentry_apply()` of a patch never loaded before ({size / 1024:,.0f} KiB) in "
                  f"an idle program of N = {ctx.n:,}, one per process, timed from the call to "
                  "its return.")


def stacked_us(ctx: Context, prog: Path, base: Path, top: Path, mode: str) -> float:
    out = ctx.run([prog, "stack", base, top, ctx.scale.apply_cycles], mode=mode)
    return float(out["top_apply_us_med"])


def alone_us(ctx: Context, prog: Path, top: Path, mode: str) -> float:
    return float(ctx.run([prog, "apply", top, ctx.scale.apply_cycles], mode=mode)["apply_us_med"])


@row("stacked_apply", "apply of a patch of K/10 functions on top of an active K-function "
     "patch replacing the same functions, against the same patch alone",
     "O(K of the new patch): ≤ 2× alone")
def stacked_apply(ctx: Context) -> Result:
    prog = ctx.programs.program(ctx.n, "fentry")
    big = ctx.scale.ks[-1]
    small = max(1, big // 10)
    base = ctx.programs.patch(prog, ctx.n, big, "adjacent")
    top = ctx.programs.patch(prog, ctx.n, small, "adjacent")
    variants = {}
    for mode in ("dispatch", "jump"):
        variants[f"{mode} stacked"] = lambda m=mode: stacked_us(ctx, prog, base, top, m)
        variants[f"{mode} alone"] = lambda m=mode: alone_us(ctx, prog, top, m)
    rounds = ctx.interleave(variants)
    figures = {}
    for mode in ("dispatch", "jump"):
        s = ctx.median_of(rounds, lambda r, m=mode: r[f"{m} stacked"])
        a = ctx.median_of(rounds, lambda r, m=mode: r[f"{m} alone"])
        figures[mode] = (s, a, s / a)
    worst = max(f[2] for f in figures.values())
    return Result(", ".join(f"{m}: {s:,.0f} µs vs {a:,.0f} µs alone ({q:.2f}×)"
                            for m, (s, a, q) in figures.items()),
                  worst <= 2.0,
                  f"K = {big:,} active, {small:,} of the same functions applied on top (median of "
                  f"{ctx.scale.apply_cycles} re-activations per process), against those "
                  f"{small:,} applied alone.  The patch table is rebuilt whole at each publish "
                  "(all active redirections): linear in them, with a small constant.")


@row("startup_patches_10k", "start-up with a K-function patch in FENTRY_PATCHES (loaded "
     "before main), against the plain build", "≤ plain + 30 ms at K = 10,000")
def startup_patches(ctx: Context) -> Result:
    plain = ctx.programs.program(ctx.n, "plain")
    # The default build (sites prepared as it is linked) is what the target is for; the
    # build with -Dfentry:sites=runtime also pays for readying every site at start
    # (startup_runtime), reported beside it.
    builds = {"": ctx.programs.program(ctx.n, "prepared"),
              "runtime ": ctx.programs.program(ctx.n, "fentry")}
    k = ctx.scale.ks[-1]
    variants = {"plain": lambda: ctx.wall([plain, "start"])}
    for label, inst in builds.items():
        patch = ctx.programs.patch(inst, ctx.n, k, "adjacent")
        out = ctx.run([inst, "calls", "1"], mode="dispatch", FENTRY_PATCHES=str(patch))
        if int(out.get("patched_seen", -1)) != k:
            raise BenchError(f"FENTRY_PATCHES={patch}: {out} (expected {k} patched)")
        for mode in ("jump", "dispatch"):
            variants[f"{label}{mode}"] = (
                lambda i=inst, m=mode, p=patch: ctx.wall([i, "start"], mode=m,
                                                         FENTRY_PATCHES=str(p)))
    rounds = ctx.interleave(variants)
    over = {key: ctx.median_of(rounds, lambda r, key=key: r[key] - r["plain"])
            for key in variants if key != "plain"}
    return Result(f"K = {k:,}: jump mode plain + {over['jump'] * 1e3:.1f} ms, dispatch mode "
                  f"plain + {over['dispatch'] * 1e3:.1f} ms (sites readied at start: jump "
                  f"plain + {over['runtime jump'] * 1e3:.1f} ms, dispatch plain + "
                  f"{over['runtime dispatch'] * 1e3:.1f} ms)",
                  max(over["jump"], over["dispatch"]) <= 0.030,
                  f"`scale start` of N = {ctx.n:,} timed from fork to exit, interleaved with "
                  "the plain build; the patch is copied, hashed, loaded, validated and "
                  "activated before main.  The target is judged on the default build (sites "
                  "prepared as it is linked); the build with `-Dfentry:sites=runtime` also "
                  "readies every site at start.")
