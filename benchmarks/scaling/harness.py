"""harness.py - rows of the scaling section: registering, running, reporting them.

A row measures one figure of a program of N functions (and patches of K), in one run, as a
ratio or a difference to a reference measured in the same rounds, and says whether it
meets its target.  Add a row by writing a function in a ``rows_<topic>.py`` module of this
package (found automatically)::

    from harness import Context, Result, row

    @row("startup_jump", "start-up, jump mode", "≤ plain + 5 ms")
    def startup(ctx: Context) -> Result:
        plain, inst = ctx.programs.program(ctx.n, "plain"), ctx.programs.program(ctx.n, "fentry")
        per_round = ctx.interleave({"plain": lambda: ctx.wall([plain, "start"]),
                                    "jump": lambda: ctx.wall([inst, "start"], mode="jump")})
        d = ctx.median_of(per_round, lambda r: r["jump"] - r["plain"])
        return Result(f"plain + {d * 1e3:.1f} ms", d <= 0.005)

Method (the same as the rest of benchmarks/run.py): the variants of a row run
round-robin, one process per measurement, ``ctx.rounds`` rounds, each round starting one
variant further on; a figure is the median over rounds of per-round figures, so ratios and
differences compare runs of the same round.  Rows check what they measure (the mode the
shim is in, which functions ran the replacement) and raise BenchError when it is wrong.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from programs import Programs

import build  # benchmarks/build.py


class BenchError(Exception):
    """A row's program failed or gave a wrong result: the run is not valid."""


@dataclass(frozen=True)
class Scale:
    n: int                 # functions in the generated program
    ks: tuple[int, ...]    # patch sizes the rows use (the largest is "K")
    rounds: int
    calls_rounds: int      # times `calls` runs over all N functions
    apply_cycles: int


FULL = Scale(n=50_000, ks=(1, 100, 1_000, 10_000), rounds=7, calls_rounds=200, apply_cycles=50)
QUICK = Scale(n=200, ks=(1, 10), rounds=1, calls_rounds=2, apply_cycles=2)


@dataclass
class Result:
    now: str                    # the measured figure, formatted
    met: bool | None            # None: a figure without a target
    detail: str = ""            # how it was measured, its parts (a sentence or two)


@dataclass
class Row:
    key: str
    what: str
    target: str
    measure: Callable[[Context], Result]
    owner: str = ""             # the module that defines it
    result: Result | None = None
    seconds: float = 0.0


ROWS: list[Row] = []


def row(key: str, what: str, target: str) -> Callable[[Callable[[Context], Result]],
                                                       Callable[[Context], Result]]:
    """Register a row: `key` is stable (selects it with --rows), `what` and `target` are its
    table cells."""
    def register(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        if any(r.key == key for r in ROWS):
            raise ValueError(f"two scaling rows named {key}")
        ROWS.append(Row(key, what, target, fn, fn.__module__))
        return fn
    return register


def kv(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


@dataclass
class Context:
    scale: Scale
    programs: Programs
    runtime: Path               # FENTRY_RUNTIME_DIR of the programs started
    quick: bool
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.scale.n

    @property
    def rounds(self) -> int:
        return self.scale.rounds

    def env(self, mode: str | None = None, **extra: str) -> dict[str, str]:
        """Our environment without FENTRY_* settings; FENTRY_MODE=mode when given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FENTRY_", "LD_PRELOAD"))}
        env["FENTRY_RUNTIME_DIR"] = str(self.runtime)
        if mode:
            env["FENTRY_MODE"] = mode
        env.update(extra)
        return env

    def run(self, argv: list[str | Path], mode: str | None = None, timeout: float = 600,
            **extra: str) -> dict[str, str]:
        """Run a program to its end; the key=value pairs of its last line.  A non-zero exit,
        anything on stderr, or a mode other than `mode` is a BenchError."""
        cmd = [str(a) for a in argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=self.env(mode, **extra))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{shlex.join(cmd)}: no result within {timeout:g} s") from None
        if proc.returncode != 0 or proc.stderr.strip():
            raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}:\n"
                             f"{proc.stdout}{proc.stderr}")
        out = kv(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        if mode and out.get("mode") != mode:
            raise BenchError(f"{shlex.join(cmd)}: mode {out.get('mode')}, expected {mode}")
        return out

    def wall(self, argv: list[str | Path], mode: str | None = None, **extra: str) -> float:
        """Seconds from fork to exit of a program that exits at once (its start-up)."""
        cmd = [str(a) for a in argv]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=self.env(mode, **extra), timeout=120)
        t = time.perf_counter() - t0
        if proc.returncode != 0 or proc.stderr:
            raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr!r}")
        return t

    def interleave(self, variants: dict[str, Callable[[], float]],
                   rounds: int | None = None) -> list[dict[str, float]]:
        """Each variant once per round, round-robin, each round starting one further on;
        `rounds` (default ctx.rounds) for rows whose variants take minutes."""
        keys = list(variants)
        got_rounds = []
        for r in range(self.rounds if rounds is None else rounds):
            got = {}
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                got[k] = variants[k]()
            got_rounds.append(got)
        return got_rounds

    @staticmethod
    def median_of(rounds: list[dict[str, float]], f: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(f(r) for r in rounds)


def load_rows() -> list[Row]:
    """Import every rows_*.py module of this package (each registers its rows)."""
    here = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda i: i.name):
        if info.name.startswith("rows_"):
            importlib.import_module(info.name)
    return ROWS


def run_rows(ctx: Context, keys: list[str] | None = None) -> list[Row]:
    """Run the rows named (all when None), in registration order; a failing row is a
    BenchError for the whole run."""
    rows = load_rows()
    if keys:
        unknown = set(keys) - {r.key for r in rows}
        if unknown:
            raise BenchError(f"no scaling rows named {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(r.key for r in rows)}")
        rows = [r for r in rows if r.key in keys]
    for r in rows:
        ctx.log(f"  scaling {r.key}: {r.what}")
        t0 = time.monotonic()
        try:
            r.result = r.measure(ctx)
        except (build.BuildError, subprocess.SubprocessError) as e:
            raise BenchError(f"scaling row {r.key}: {e}") from e
        r.seconds = time.monotonic() - t0
        ctx.log(f"  scaling {r.key}: {r.result.now} (target {r.target}) [{r.seconds:.0f} s]")
    return rows


BEGIN = "<!-- scaling section: written by benchmarks/run.py; do not edit by hand -->"
END = "<!-- end of the scaling section -->"


def section(rows: list[Row], scale: Scale, command: str, quick: bool, run: str = "") -> list[str]:
    """The scaling section of RESULTS.md (between markers, so that a --scaling-only run can
    replace it alone); `run`: when it ran, how long, the machine's load."""
    L = [BEGIN, "## Scaling: programs of N functions, patches of K", ""]
    if quick:
        L += ["**Smoke run: tiny N and K, one round. Not measurements.**", ""]
    L += [f"Command: `{command}`. " + (f"{run} " if run else "") +
          f"Generated programs of N = {scale.n:,} tiny functions "
          "(`x + i`, 100 per file, gcc -O2 -g), built plain and with the flags of "
          "`dependency('fentry')`; patches of K functions (adjacent: the first K; spread: "
          "evenly over the program) registered by the real generator "
          "(benchmarks/scaling/programs.py). Each row runs its variants round-robin, "
          f"{scale.rounds} rounds, one process per measurement; a figure is the median over "
          "rounds of the per-round figure (ratios and differences within one round).", "",
          "| row | what | now | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        if r.result is None:
            continue
        met = {True: "yes", False: "**no**", None: "—"}[r.result.met]
        L.append(f"| `{r.key}` | {r.what} | {r.result.now} | {r.target} | {met} |")
    L += [""]
    for r in rows:
        if r.result is not None and r.result.detail:
            L += [f"- `{r.key}`: {r.result.detail}"]
    L += ["", END]
    return L


def splice(path: Path, lines: list[str]) -> None:
    """Put the scaling section into `path`, replacing the one there (or appending it)."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    path.write_text(text)
