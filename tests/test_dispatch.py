"""Dispatch mode's patch table and __fentry__: short probes at any K, frames a debugger can walk.

- The table (shim/core/table.c) is probed by __fentry__ (shim/arch/x86_64/entry.S) with the
  hash of shim/arch/x86_64/table_layout.h.  tests/c/table_probe.c publishes K of N
  neighbouring functions, the way a patch of adjacent functions does, and walks the table
  as entry.S does for all N keys: every key is found or not as it should be, and no probe
  sequence is long (an earlier hash, `((key >> 7) ^ key) & mask`, clustered neighbouring
  functions into runs of hundreds of slots).
- entry.S carries CFI: stopped inside __fentry__'s full lookup (three registers pushed), gdb
  still unwinds through it to the instrumented function and its callers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fentry_build import paths

from support.builds import SHIM_CFLAGS, run, shim_includes

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def table_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "table_probe"
    run(["gcc", *SHIM_CFLAGS, *shim_includes(), str(paths.shim_dir() / "core" / "table.c"),
         str(TESTS / "c" / "table_probe.c"), "-o", str(out)])
    return out


@pytest.mark.parametrize("k", [1, 100, 1_000, 10_000])
@pytest.mark.parametrize("spacing", [16, 48, 112])
@pytest.mark.parametrize("layout", ["adjacent", "spread"])
def test_probes_stay_short_for_neighbouring_functions(table_probe: Path, k: int, spacing: int,
                                                       layout: str) -> None:
    out = subprocess.run([str(table_probe), "50000", str(k), str(spacing), layout],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    f = {key: int(v) for key, v in (kv.split("=") for kv in out.split())}
    assert f["wrong"] == 0, out  # every patched key finds its target, every other key none
    # Slots read per lookup (1 = the home slot).  The load factor is at most one half.
    assert f["hit_max"] <= 16 and f["miss_max"] <= 16, out
    assert f["hit_p99"] <= 12 and f["miss_p99"] <= 12, out


def objdump_address(binary: Path, symbol: str, pattern: str | None = None) -> int:
    """Link-time address of `symbol`, or of its first instruction matching `pattern`."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)],
                         capture_output=True, text=True, check=True).stdout
    body = dis.split(f"<{symbol}>:\n", 1)[1].split("\n\n", 1)[0]
    for line in body.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if m and (pattern is None or re.search(pattern, m.group(2))):
            return int(m.group(1), 16)
    raise AssertionError(f"no instruction matching {pattern!r} in {symbol}")


@pytest.mark.needs_gdb
def test_gdb_unwinds_through_the_full_lookup_of_fentry(
        gdb_build: tuple[Path, Path], tmp_path: Path) -> None:
    prog, patch = gdb_build
    # The hit: the replacement's address goes over the return address, three pushes down.
    # (Named from rel_stop: glibc has a __fentry__ of its own, which gdb would pick.)
    hit = objdump_address(prog, "__fentry__", r"mov\s+%rdx,0x18\(%rsp\)")
    off = hit - objdump_address(prog, "rel_stop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_MODE": "dispatch", "FENTRY_CONTROL": "0"})
    argv = [shutil.which("gdb") or "gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off",
            "-ex", "break rel_stop", "-ex", "run", "-ex", f"break *((char *)&rel_stop + {off})",
            "-ex", "continue", "-ex", "bt", "-ex", "continue",
            "--args", str(prog), "asc", str(patch)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                         timeout=120, cwd=tmp_path).stdout
    assert "apply ok" in out, out
    frames = [line for line in out.splitlines() if re.match(r"#\d+\s", line)]
    names = [re.sub(r"^#\d+\s+(0x[0-9a-f]+ in )?", "", f).split(" ")[0] for f in frames]
    # __fentry__, called at rel_target's entry; rel_target's caller; main.
    assert names[:4] == ["__fentry__", "rel_target", "rel_caller", "main"], out
    assert "result 202" in out and "exited normally" in out, out
