"""binary/check.py - `fentry-build check`: is a binary instrumented, its build-id and its patchable functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fentry_build.binary.elf import FunctionInfo
from fentry_build.binary.program import Program


def _function_entry(f: FunctionInfo) -> dict[str, Any]:
    assert f.site is not None
    clone = f.clone
    return {
        "name": f.name,
        "file": f.file,
        "addr": f.addr,
        "site_form": f.site.form.value,
        "site_offset": f.site.offset,
        "site_len": f.site.length,
        "clone_of": clone.base if clone.is_clone else None,
    }


def _counts_as_uninstrumented(f: FunctionInfo) -> bool:
    """No site, and not one that never has one (start-up code, `.cold` parts of another function)."""
    return f.site is None and not f.is_toolchain and not f.clone.is_cold_part


def check_binary(path: Path) -> dict[str, Any]:
    """A JSON-able report on `path`; FentryError if it is not a readable x86-64 ELF."""
    with Program.open(path) as program:
        info = program.info
    sited = sorted((f for f in info.functions if f.site is not None), key=lambda f: f.addr)
    return {
        "path": str(path),
        "instrumented": bool(sited),
        "build_id": info.build_id_hex,
        "has_symtab": info.has_symtab,
        "functions": [_function_entry(f) for f in sited],
        "uninstrumented": sum(1 for f in info.functions if _counts_as_uninstrumented(f)),
        # The sites were prepared at build time (build/prepare.py): jump mode writes nothing
        # at start; dispatch mode puts the calls back.
        "sites_prepared": any(f.site.form.prepared for f in sited if f.site is not None),
    }


def _summary(report: dict[str, Any]) -> list[str]:
    functions = report["functions"]
    forms = sorted({f["site_form"] for f in functions})
    lines = [
        f"{report['path']}: {'instrumented' if report['instrumented'] else 'NOT instrumented'}",
        f"  build-id:  {report['build_id'] or 'none (link with -Wl,--build-id to patch it)'}",
        f"  patchable: {len(functions)} function(s)"
        + (f", call form {', '.join(forms)}" if forms else ""),
        f"  without a fentry site: {report['uninstrumented']} function(s)",
    ]
    if report.get("sites_prepared"):
        lines.append("  sites:     prepared at build time (67 a9 / a9: the unpatched form of "
                     "the calls)")
    if not report.get("has_symtab", True):
        lines.append("  no .symtab (stripped): only exported functions are listed")
    if not report["instrumented"]:
        lines.append("  compile the program's sources with dependency('fentry') / -pg -mfentry")
    return lines


def _table(functions: list[dict[str, Any]]) -> list[str]:
    rows = [("ADDRESS", "FORM", "SITE", "FUNCTION", "FILE")]
    for f in functions:
        site = f"+{f['site_offset']}:{f['site_len']}"
        name = f["name"] + (f"  (clone of {f['clone_of']})" if f.get("clone_of") else "")
        rows.append((f"0x{f['addr']:x}", f["site_form"], site, name, f["file"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def format_report(report: dict[str, Any]) -> str:
    """Human-readable form of check_binary's report: a summary and a table of functions."""
    lines = _summary(report)
    if report["functions"]:
        lines += ["", *_table(report["functions"])]
    return "\n".join(lines)
