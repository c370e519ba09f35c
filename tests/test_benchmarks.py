"""The benchmark suite's smoke run: every variant builds, runs and checks its result.

`python benchmarks/run.py --quick` runs each variant of the micro, apply and macro
benchmarks, and each row of the scaling section, once with tiny counts; each program
checks which code ran (the patched variants that they ran the replacement, the modes that
the shim is in the mode asked for).  No timing is asserted here: the numbers of a smoke
run mean nothing (the timeout only bounds a hang on a loaded machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not RUN.is_file(), reason="benchmarks/ is not in this tree")]

#: The markers around the scaling section of a report (benchmarks/scaling/harness.py).
BEGIN = "<!-- scaling section: written by benchmarks/run.py; do not edit by hand -->"
END = "<!-- end of the scaling section -->"


def quick_run(*args: str) -> subprocess.CompletedProcess[str]:
    """`run.py --quick ARGS`, without the FENTRY_ variables of this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    return subprocess.run([sys.executable, str(RUN), "--quick", *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)


def test_quick_benchmark_runs_every_variant_and_checks_it(tmp_path: Path) -> None:
    report = tmp_path / "RESULTS.md"
    proc = quick_run("--results", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every variant ran and checked its result" in proc.stderr

    text = report.read_text()
    assert "Smoke run" in text
    for row in ("uninstrumented (gcc -O2)", "direct call of the replacement's code",
                "dispatch, unpatched", "dispatch, table active", "dispatch, patched",
                "jump, unpatched", "jump, patched"):
        assert f"| {row}" in text, row
    for row in ("jump, idle program", "jump, one thread calling tiny()",
                "dispatch, idle program", "dispatch, one thread calling tiny()"):
        assert f"| {row}" in text, row
    if (ROOT / "examples" / "server" / "server.c").is_file():
        for row in ("instrumented, jump mode", "instrumented, dispatch mode",
                    "jump mode, fix_parse applied", "dispatch mode, fix_parse applied"):
            assert f"| {row}" in text, row
    # The scaling section: every row of benchmarks/scaling/rows_*.py, between its markers.
    assert "## Scaling: programs of N functions, patches of K" in text
    for key in ("startup_runtime", "startup_prepared", "memory_idle_runtime",
                "memory_idle_prepared", "apply_jump_one", "apply_jump_100",
                "apply_jump_10k", "dispatch_miss", "jump_unpatched_calls",
                "cli_help", "cli_apply", "cli_status_list", "generator_10k", "generator_50k"):
        assert f"| `{key}` |" in text, key
    # XRay rows exactly when clang is there, and the report says why they are missing.
    if "clang is not installed" in text:
        assert "| LLVM XRay" not in text
    else:
        assert "| LLVM XRay, unpatched" in text and "| LLVM XRay, patched" in text


def test_a_scaling_only_run_replaces_its_section_and_keeps_the_rest(tmp_path: Path) -> None:
    """`--scaling-only --rows KEY` runs one row and splices its section into the report."""
    report = tmp_path / "RESULTS.md"
    report.write_text(f"# earlier results\n\n{BEGIN}\nold rows\n{END}\n\nafter\n")
    proc = quick_run("--scaling-only", "--rows", "apply_jump_one", "--results", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert text.startswith("# earlier results\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    assert "old rows" not in text and "| `apply_jump_one` |" in text
    assert "| `dispatch_miss` |" not in text  # only the row asked for ran


def test_a_run_without_scaling_keeps_the_reports_scaling_section(tmp_path: Path) -> None:
    """`--no-scaling` rewrites the micro, apply and macro sections and leaves the scaling
    section, and what follows it (written by hand), as they were."""
    report = tmp_path / "RESULTS.md"
    report.write_text(f"# earlier results\n\nold micro\n\n{BEGIN}\nold rows\n{END}\n\nafter\n")
    proc = quick_run("--no-scaling", "--results", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    assert text.startswith("# fentry_build benchmark results") and "old micro" not in text
    assert "| jump, patched (site = jmp) |" in text
    assert text.endswith(f"\n\n{BEGIN}\nold rows\n{END}\n\nafter\n")
