"""rows_cli.py - what the `fentry-build` command costs, run as a user runs it.

Targets from the issue "Performance at scale" (16): `fentry-build apply` end to end ≤ 50 ms,
`status` and `list` ≤ 40 ms, on an idle machine.  Each call is a new interpreter (the
command's own script, installed beside the Python that runs the benchmark), timed from fork
to exit, against `python -c pass` of the same Python in the same rounds: the difference is
what fentry_build itself costs (imports, the request, the process's answer), the reference
what no Python command can go below.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import BenchError, Context, Result, row


def command() -> list[str]:
    """`fentry-build` as installed beside this Python, else `python -m fentry_build`."""
    script = Path(sys.executable).parent / "fentry-build"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fentry_build"]


Timing = tuple[float, float]  # (wall seconds from fork to exit, CPU seconds)


def timed(ctx: Context, argv: list[str]) -> tuple[Timing, str]:
    """((wall, CPU seconds), stdout) of a command that must succeed silently on stderr; CPU
    (user + system, from wait4()) is what the command costs apart from waiting for a core."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=ctx.env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0 or stderr.strip():
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}:\n{stdout}{stderr}")
    return (wall, usage.ru_utime + usage.ru_stime), stdout


REF = "python -c pass"


def reference(ctx: Context) -> Timing:
    return timed(ctx, [sys.executable, "-c", "pass"])[0]


def interleave(ctx: Context, variants: dict[str, Callable[[], Timing]]) -> list[dict[str, float]]:
    """ctx.interleave over timed variants: each round has `key` (wall) and `key cpu`."""
    cpu: dict[str, list[float]] = {k: [] for k in variants}

    def wall_of(k: str) -> float:
        wall, c = variants[k]()
        cpu[k].append(c)
        return wall

    rounds = ctx.interleave({k: lambda k=k: wall_of(k) for k in variants})
    for i, r in enumerate(rounds):
        for k in variants:
            r[f"{k} cpu"] = cpu[k][i]
    return rounds


class Idle:
    """An instrumented program of N functions started idle (`scale idle`), for the commands
    to talk to."""

    def __init__(self, ctx: Context) -> None:
        self.prog = ctx.programs.program(ctx.n, "fentry")
        self.proc = subprocess.Popen([str(self.prog), "idle"], env=ctx.env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "ready=1" not in line:
            self.close()
            raise BenchError(f"{self.prog} idle: {line!r}")
        self.pid = str(self.proc.pid)

    def close(self) -> None:
        _, err = self.proc.communicate(timeout=30)
        if self.proc.returncode != 0 or err.strip():
            raise BenchError(f"{self.prog} idle exited {self.proc.returncode}: {err!r}")


def ms(ctx: Context, rounds: list[dict[str, float]], key: str) -> str:
    """"W ms (python +D ms; CPU C ms)": median wall, median difference to the reference's
    wall in the same round, median CPU time."""
    w = ctx.median_of(rounds, lambda r: r[key])
    d = ctx.median_of(rounds, lambda r: r[key] - r[REF])
    c = ctx.median_of(rounds, lambda r: r[f"{key} cpu"])
    return f"{w * 1e3:.0f} ms (python +{d * 1e3:.0f} ms; CPU {c * 1e3:.0f} ms)"


def reference_note(ctx: Context, rounds: list[dict[str, float]]) -> str:
    w = ctx.median_of(rounds, lambda r: r[REF])
    c = ctx.median_of(rounds, lambda r: r[f"{REF} cpu"])
    return (f"`python -c pass` of the same Python: {w * 1e3:.0f} ms wall, {c * 1e3:.0f} ms CPU, "
            f"in the same rounds ({len(rounds)} rounds, each call a new process, wall from fork "
            f"to exit, CPU from wait4(); the command: `{shlex.join(command())}`).")


# What `apply`, `status` and `list` import before they send anything (cli.py imports
# fleet.command inside the command's function).  Run with -P, as the command's script runs:
# the installed package, not a checkout in the working folder.
IMPORTS = "import fentry_build.cli, fentry_build.fleet.command"
# The floor of any Python command that parses its command line with argparse and speaks JSON
# (both import re, and re imports enum): what the targets have to leave room for.
FLOOR = "import argparse, json, socket"


@row("cli_help", "`fentry-build --help`: the interpreter, the package's import and the "
     "parser; beside it, importing what apply/status/list import", "figure (the commands "
     "below include it)")
def cli_help(ctx: Context) -> Result:
    def help_() -> Timing:
        t, out = timed(ctx, [*command(), "--help"])
        if "usage: fentry-build" not in out:
            raise BenchError(f"fentry-build --help printed {out!r}")
        return t

    rounds = interleave(ctx, {REF: lambda: reference(ctx), "help": help_,
                              "imports": lambda: timed(ctx, [sys.executable, "-P", "-c", IMPORTS])[0],
                              "floor": lambda: timed(ctx, [sys.executable, "-P", "-c", FLOOR])[0]})
    return Result(f"{ms(ctx, rounds, 'help')}; `python -P -c '{IMPORTS}'` "
                  f"{ms(ctx, rounds, 'imports')}; the floor, `python -P -c '{FLOOR}'`, "
                  f"{ms(ctx, rounds, 'floor')}",
                  None, reference_note(ctx, rounds))


@row("cli_apply", "`fentry-build apply --pid PID PATCH.so` end to end (a one-function patch, "
     "a program of N functions)", "≤ 50 ms")
def cli_apply(ctx: Context) -> Result:
    idle = Idle(ctx)
    k = ctx.scale.ks[0]
    patch = ctx.programs.patch(idle.prog, ctx.n, k, "adjacent")
    try:
        def apply() -> Timing:
            t, out = timed(ctx, [*command(), "apply", "--pid", idle.pid, str(patch), "--json"])
            reply = json.loads(out)
            if not reply.get("ok") or reply.get("changed") is False:
                raise BenchError(f"fentry-build apply {patch}: {out}")
            return t

        def revert() -> Timing:
            t, out = timed(ctx, [*command(), "revert", "--pid", idle.pid, patch.stem, "--json"])
            if not json.loads(out).get("ok"):
                raise BenchError(f"fentry-build revert {patch.stem}: {out}")
            return t

        apply()
        listed = active_functions(ctx, idle, patch)
        if listed != k:
            raise BenchError(f"after apply, list shows {listed} functions of {patch.stem}, not {k}")
        revert()
        reverts: list[Timing] = []

        def cycle() -> Timing:  # every apply changes the process: the patch is reverted after
            t = apply()
            reverts.append(revert())
            return t

        rounds = interleave(ctx, {REF: lambda: reference(ctx), "apply": cycle})
        for r, (wall, cpu) in zip(rounds, reverts):
            r["revert"], r["revert cpu"] = wall, cpu
    finally:
        idle.close()
    wall = ctx.median_of(rounds, lambda r: r["apply"])
    return Result(f"{ms(ctx, rounds, 'apply')}; revert {ms(ctx, rounds, 'revert')}", wall <= 0.050,
                  f"An idle program of N = {ctx.n:,} (default mode); each apply is checked "
                  "(`--json`: ok, changed) and followed by a revert (timed apart), so that every "
                  "apply changes the process; `list` showed the patch's functions active. "
                  + reference_note(ctx, rounds))


def active_functions(ctx: Context, idle: Idle, patch: Path) -> int:
    """The functions `list --json` shows for the patch."""
    _, out = timed(ctx, [*command(), "list", "--pid", idle.pid, "--json"])
    for p in json.loads(out).get("patches", []):
        if p.get("name") == patch.stem:
            return len(p.get("functions", []))
    raise BenchError(f"fentry-build list: {patch.stem} not listed after apply: {out}")


@row("cli_status_list", "`fentry-build status --pid PID` and `list --pid PID` (one patch "
     "applied, a program of N functions)", "≤ 40 ms each")
def cli_status_list(ctx: Context) -> Result:
    idle = Idle(ctx)
    patch = ctx.programs.patch(idle.prog, ctx.n, ctx.scale.ks[0], "adjacent")
    try:
        timed(ctx, [*command(), "apply", "--pid", idle.pid, str(patch)])

        def status() -> Timing:
            t, out = timed(ctx, [*command(), "status", "--pid", idle.pid, "--json"])
            reply = json.loads(out)
            if reply.get("pid") != idle.proc.pid or reply.get("patches_active") != 1:
                raise BenchError(f"fentry-build status --pid {idle.pid}: {out}")
            return t

        def list_() -> Timing:
            t, out = timed(ctx, [*command(), "list", "--pid", idle.pid, "--json"])
            if patch.stem not in {p.get("name") for p in json.loads(out).get("patches", [])}:
                raise BenchError(f"fentry-build list --pid {idle.pid}: {out}")
            return t

        rounds = interleave(ctx, {REF: lambda: reference(ctx), "status": status, "list": list_})
    finally:
        idle.close()
    worst = max(ctx.median_of(rounds, lambda r: r["status"]),
                ctx.median_of(rounds, lambda r: r["list"]))
    return Result(f"status {ms(ctx, rounds, 'status')}; list {ms(ctx, rounds, 'list')}",
                  worst <= 0.040,
                  f"An idle program of N = {ctx.n:,} with a one-function patch applied; each "
                  "answer checked (`--json`). " + reference_note(ctx, rounds))
