"""The shim at run time: real instrumented programs, real patches, real dlopen, no mocks.

Every program here is built by real gcc with the shim linked in (tests/support/builds.py), every
patch by the real generator, and every test runs the program as a process and asserts
what it prints.  The C sources are in tests/programs/.  Patches arrive through
FENTRY_PATCHES only; the control channel is switched off (FENTRY_CONTROL=0) except where
a test says otherwise, and is tested in test_control_proto.py.  Where the shim's two
modes could differ, a test runs in both (FENTRY_MODE=jump: sites rewritten; dispatch:
every instrumented call looks itself up in the patch table) and checks the mode the
program reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from fentry_build import paths

from support.builds import PROGRAMS, SHIM_CFLAGS, build_patch, build_program, run, shim_includes, shim_sources

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

HELLO = paths.examples_dir() / "hello"
TIMEOUT = 60  # seconds any one program run or CLI call may take
ENDBR64 = bytes.fromhex("f30f1efa")


# ---- running programs ---------------------------------------------------------------------

MODES = ("jump", "dispatch")  # FENTRY_MODE: rewritten sites, or every call through the table


def program_env(patches: str | None = None, mode: str | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test run: no FENTRY_* or LD_PRELOAD from outside, channel off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_") and k != "LD_PRELOAD"}
    env["FENTRY_CONTROL"] = "0"
    if patches is not None:
        env["FENTRY_PATCHES"] = patches
    if mode is not None:
        env["FENTRY_MODE"] = mode
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Run:
    """A finished run; the programs of tests/programs print "mode: M" first, kept apart."""

    returncode: int
    mode: str | None  # the shim's mode the program reported, or None (examples/hello)
    stdout: str       # without the mode line
    stderr: str

    @property
    def clean(self) -> str:
        """stdout of a run that exited 0 and said nothing on stderr."""
        assert (self.returncode, self.stderr) == (0, ""), self
        return self.stdout


def run_program(binary: Path, *args: str, patches: str | None = None, mode: str | None = None,
                cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> Run:
    """Run `binary` to its end; every run also checks that it wrote no gmon.out in its cwd."""
    cwd = cwd or binary.parent
    proc = subprocess.run([str(binary), *args], cwd=cwd, env=program_env(patches, mode, extra_env),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert not (cwd / "gmon.out").exists(), f"{binary.name} wrote gmon.out in {cwd}"
    out, reported = proc.stdout, None
    if out.startswith("mode: "):
        first, _, out = out.partition("\n")
        reported = first[len("mode: "):]
    return Run(proc.returncode, reported, out, proc.stderr)


def refusal(result: Run, path: str | Path) -> str:
    """The reason of the one-line refusal of `path` on stderr; the program itself ran to exit 0."""
    assert result.returncode == 0, result
    lines = result.stderr.splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n"), result.stderr
    prefix = f"fentry: patch {path} not loaded: "
    assert lines[0].startswith(prefix), result.stderr
    return lines[0][len(prefix):].rstrip("\n")


def check_json(binary: Path) -> dict[str, Any]:
    """`python -m fentry_build check BINARY --json`, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(paths.data_dir()), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fentry_build", "check", str(binary), "--json"],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert proc.returncode == 0, proc
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def checked_function(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [f for f in report["functions"] if f["name"] == name]
    assert len(found) == 1, report["functions"]
    return found[0]


def entry_bytes(binary: Path, addr: int, size: int) -> bytes:
    """`size` bytes of the file's image at link-time address `addr` (read without fentry_build)."""
    with open(binary, "rb") as stream:
        for sec in ELFFile(stream).iter_sections():
            start = sec["sh_addr"]
            if sec["sh_type"] == "SHT_PROGBITS" and start <= addr < start + sec["sh_size"]:
                return bytes(sec.data()[addr - start: addr - start + size])
    raise AssertionError(f"no section of {binary} holds 0x{addr:x}")


# ---- building -------------------------------------------------------------------------------


def patch(binary: Path, source: Path, out_dir: Path) -> Path:
    """Build the patch `source` for `binary` into out_dir/STEM.so, mode 0755 whatever the umask
    (the loader refuses patches that group or others can write)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    so = build_patch(binary, source, out_dir / f"{source.stem}.so")
    so.chmod(0o755)
    return so


@dataclass
class Built:
    """A program and the patches built for it, by patch name."""

    binary: Path
    patches: dict[str, Path] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.binary.parent


def build(out_dir: Path, name: str, sources: list[str], patch_names: list[str], *,
          cflags: list[str] | None = None, ldflags: list[str] | None = None,
          with_shim: bool = True) -> Built:
    """Program tests/programs/{sources} as out_dir/name, and each patch tests/programs/{p}.c."""
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = build_program([PROGRAMS / s for s in sources], out_dir / name, cflags=cflags,
                           ldflags=ldflags, with_shim=with_shim)
    built = Built(binary)
    for p in patch_names:
        built.patches[p] = patch(binary, PROGRAMS / f"{p}.c", out_dir / "patches")
    return built


@pytest.fixture(scope="module")
def compute(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """compute.c (PIE, shim linked) with patches x*2+1, -x and the clamping wrapper."""
    return build(tmp_path_factory.mktemp("compute"), "compute", ["compute.c"],
                 ["compute_plus", "compute_neg", "compute_clamp"])


COMPUTE_UNPATCHED = "v1 compute(21) = 42\nother(21) = 22\n"
COMPUTE_PLUS = "v1 compute(21) = 43\nother(21) = 22\n"
COMPUTE_NEG = "v1 compute(21) = -21\nother(21) = 22\n"
CLAMPED_500 = ("compute_clamped(500): calling the original with 100\n"
               "v1 compute(500) = 200\nother(500) = 501\n")


# ---- 1. the hello example ---------------------------------------------------------------------

HELLO_UNPATCHED = "my function: 123!\n"
HELLO_PATCHED = "my_patch: 123\n"


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """examples/hello built with -flive-patching=inline-only-static on top of build_program's flags.

    hello.c's my_function is a small global function called once from main: under
    build_program's -O2 -flive-patching=inline-clone GCC inlines it into main, and the inlined
    copy never reaches the fentry site (test_hello_example_with_cbuild_default_flags_
    is_patched below).  inline-only-static (the later -flive-patching wins) stops GCC
    inlining global functions, so main really calls my_function.
    """
    d = tmp_path_factory.mktemp("hello")
    binary = build_program([HELLO / "hello.c"], d / "hello",
                           cflags=["-flive-patching=inline-only-static"])
    built = Built(binary)
    built.patches["my_patch"] = patch(binary, HELLO / "patches" / "my_patch.c", d / "patches")
    return built


def test_hello_unpatched_prints_my_function(hello: Built) -> None:
    assert run_program(hello.binary).clean == HELLO_UNPATCHED
    assert run_program(hello.binary, patches="").clean == HELLO_UNPATCHED


@pytest.mark.parametrize("mode", MODES)
def test_hello_patch_by_absolute_path_replaces_my_function(hello: Built, mode: str) -> None:
    result = run_program(hello.binary, patches=str(hello.patches["my_patch"]), mode=mode)
    assert result.clean == HELLO_PATCHED


def test_hello_patch_directory_loads_the_patches_in_it(hello: Built) -> None:
    result = run_program(hello.binary, patches=str(hello.dir / "patches"))
    assert result.clean == HELLO_PATCHED


@pytest.mark.parametrize("entry, cwd", [
    ("my_patch.so", "patches"),          # a file in the current directory
    ("patches/my_patch.so", "."),        # a relative path with a directory
    ("patches", "."),                    # a relative directory of patches
    ("./patches/../patches/my_patch.so", "."),
])
def test_hello_patch_by_relative_path_is_taken_from_the_cwd(hello: Built, entry: str,
                                                            cwd: str) -> None:
    result = run_program(hello.binary, patches=entry, cwd=hello.dir / cwd)
    assert result.clean == HELLO_PATCHED


def test_hello_patch_list_with_empty_entries(hello: Built) -> None:
    result = run_program(hello.binary, patches=f"::{hello.patches['my_patch']}:")
    assert result.clean == HELLO_PATCHED


def test_hello_patch_with_the_control_channel_on_prints_nothing_else(hello: Built,
                                                                    tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    env = program_env(str(hello.patches["my_patch"]), extra={"FENTRY_RUNTIME_DIR": str(rundir)})
    del env["FENTRY_CONTROL"]  # the default: the control thread starts
    proc = subprocess.run([str(hello.binary)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, HELLO_PATCHED, "")
    assert not (tmp_path / "gmon.out").exists()


def test_hello_example_with_cbuild_default_flags_is_patched(tmp_path: Path) -> None:
    """The example exactly as tests/support/builds.py builds any program.

    Fails today: at -O2 -flive-patching=inline-clone GCC inlines my_function into main,
    so the patch loads without a word at run time and changes nothing (the generator
    only warns).  hello.c needs __attribute__((noinline)), or the instrumentation flags
    -flive-patching=inline-only-static.
    """
    binary = build_program([HELLO / "hello.c"], tmp_path / "hello")
    so = patch(binary, HELLO / "patches" / "my_patch.c", tmp_path)
    assert run_program(binary).clean == HELLO_UNPATCHED
    assert run_program(binary, patches=str(so)).clean == HELLO_PATCHED


# ---- 2. arguments, through the table lookup (dispatch) and the rewritten sites (jump) -------

# What each function of args.c prints for the values main passes; {name} is the
# function's name (original or _kept twin) or "patched <name>" in a replacement.
ARGS_LINES = {
    "six_ints": "{name}: -1 -2147483648 1311768467463790320 18364758544493064720 -12345 -7",
    "eight_ints": "{name}: 1 -2 3 -4 5 -6 9223372036854775807 -9223372036854775808",
    "eight_doubles": ("{name}: -0 9.9999999999999694e-311 3.1415926535897931 "
                      "-2.5000000000000001e+300 0.33333333333333331 7 -1.0000000000000001e-05 "
                      "1.7976931348623157e+308"),
    "mixed": "{name}: -5 0.10000000000000001 1099511627776 1.5 Z -0.0625",
    "varargs": ("{name}: -42 0.10000000000000001 -9000000000000000000 -2.5 "
                "9.9999999999999694e-311 7 3 4.5 -1.0000000000000001e+300 6.25 7.125 8.0625 end"),
    "by_struct": "{name}: -3 2147483647 -0.375 1 -2 3000000000 -4000000000 5 -99",
}
# What main prints of each return value: the original's, then the replacement's.
ARGS_RESULTS = {
    "six_ints": ("=> -12346", "=> 12344"),
    "eight_ints": ("=> -1", "=> -9223372036854775807"),
    "eight_doubles": ("=> 1.7976931348623157e+308", "=> -2.0000000000000002e-05"),
    "mixed": ("=> 0.20000000000000001", "=> -0.25"),
    "varargs": ("=> 129", "=> -129"),
    "by_struct": ("=> -94", "=> -3999999901"),
    "make_big": ("{name} => -77 -3 2147483647 0 77", "{name} => 77 2147483647 -3 -3 -154"),
}
ARGS_PATCHED_LINES = 13  # the lines of the calls of the patched functions; the _kept ones follow


def args_expected(suffix: str, patched: bool) -> list[str]:
    lines = []
    for func, (orig_result, new_result) in ARGS_RESULTS.items():
        name = func + suffix
        if func in ARGS_LINES:
            lines.append(ARGS_LINES[func].format(name=f"patched {name}" if patched else name))
        lines.append((new_result if patched else orig_result).format(name=name))
    return lines


@pytest.fixture(scope="module")
def args_program(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("args"), "args", ["args.c"], ["args_patch"])


@pytest.mark.parametrize("mode", MODES)
def test_args_unpatched_program_prints_the_values_passed(args_program: Built, mode: str) -> None:
    result = run_program(args_program.binary, mode=mode)
    assert result.mode == mode
    assert result.clean.splitlines() == args_expected("", False) + args_expected("_kept", False)


@pytest.mark.parametrize("mode", MODES)
def test_replacements_receive_every_argument_exactly(args_program: Built, mode: str) -> None:
    """Six integers (negative, 64-bit, narrow), eight with two on the stack, eight doubles,
    mixed int/float/double, varargs with nine doubles (al must survive __fentry__), a
    struct in registers and one in memory, and a struct returned through rdi."""
    result = run_program(args_program.binary, patches=str(args_program.patches["args_patch"]),
                         mode=mode)
    assert result.mode == mode
    assert result.clean.splitlines()[:ARGS_PATCHED_LINES] == args_expected("", True)


@pytest.mark.parametrize("mode", MODES)
def test_unpatched_functions_get_exact_arguments_while_a_patch_is_active(args_program: Built,
                                                                         mode: str) -> None:
    """The _kept twins are instrumented but not patched.  In dispatch mode their calls
    take the table lookup of __fentry__ and miss; every argument register must come
    through.  In jump mode their sites are NOPs beside patched ones."""
    result = run_program(args_program.binary, patches=str(args_program.patches["args_patch"]),
                         mode=mode)
    assert result.mode == mode
    assert result.clean.splitlines()[ARGS_PATCHED_LINES:] == args_expected("_kept", False)


# ---- 3. static functions -----------------------------------------------------------------------

STATICS_SOURCES = ["statics_main.c", "static_a.c", "static_b.c"]
STATICS_UNPATCHED = {"a_scale(5)": "50", "b_scale(5)": "100", "a_bias(5)": "1005"}


@pytest.fixture(scope="module")
def statics(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("statics"), "statics", STATICS_SOURCES,
                 ["bias_patch", "scale_a_patch", "scale_b_patch"])


def statics_output(result: Run) -> dict[str, str]:
    return dict(line.split(" = ") for line in result.clean.splitlines())


def test_statics_unpatched(statics: Built) -> None:
    assert statics_output(run_program(statics.binary)) == STATICS_UNPATCHED


@pytest.mark.parametrize("mode", MODES)
def test_static_function_of_the_program_is_replaced(statics: Built, mode: str) -> None:
    result = run_program(statics.binary, patches=str(statics.patches["bias_patch"]), mode=mode)
    assert statics_output(result) == STATICS_UNPATCHED | {"a_bias(5)": "-995"}


@pytest.mark.parametrize("patch_name, changed", [
    ("scale_a_patch", {"a_scale(5)": "-5"}),
    ("scale_b_patch", {"b_scale(5)": "-10"}),
])
def test_static_named_by_file_replaces_only_that_files_function(statics: Built, patch_name: str,
                                                                changed: dict[str, str]) -> None:
    result = run_program(statics.binary, patches=str(statics.patches[patch_name]))
    assert statics_output(result) == STATICS_UNPATCHED | changed


def test_both_same_named_statics_replaced_by_two_patches(statics: Built) -> None:
    both = f"{statics.patches['scale_a_patch']}:{statics.patches['scale_b_patch']}"
    result = run_program(statics.binary, patches=both)
    assert statics_output(result) == STATICS_UNPATCHED | {"a_scale(5)": "-5", "b_scale(5)": "-10"}


# ---- 4. build variants and call-site forms --------------------------------------------------


@pytest.fixture(scope="module")
def shim_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim as a shared library, for programs whose __fentry__ is outside them."""
    out = tmp_path_factory.mktemp("shimlib") / "libfentryshim.so"
    run(["gcc", *SHIM_CFLAGS, "-shared", *shim_includes(), "-o", str(out),
         *map(str, shim_sources()), "-lpthread", "-ldl"])
    return out


@dataclass(frozen=True)
class Variant:
    cflags: tuple[str, ...]
    form: str          # site_form of `check --json`
    site_offset: int   # 4 after endbr64
    shim: str = "linked"  # "linked" objects, "shared" library, "preload" (glibc's __fentry__ at link)


VARIANTS = {
    "pie": Variant((), "67 e8", 0),
    "no-pie": Variant(("-fno-pie",), "e8", 0),
    "cf-protection": Variant(("-fcf-protection",), "67 e8", 4),
    "cf-protection-no-pie": Variant(("-fcf-protection", "-fno-pie"), "e8", 4),
    "pie-shared-shim": Variant((), "ff 15", 0, shim="shared"),
    "pie-preloaded-shim": Variant((), "ff 15", 0, shim="preload"),
}


@pytest.mark.parametrize("variant_name", list(VARIANTS))
@pytest.mark.slow
def test_patch_works_in_each_build_variant(variant_name: str, tmp_path: Path,
                                           shim_library: Path) -> None:
    v = VARIANTS[variant_name]
    ldflags = ["-no-pie"] if "-fno-pie" in v.cflags else []
    extra_env = {}
    if v.shim == "shared":
        ldflags += ["-Wl,--no-as-needed", str(shim_library), f"-Wl,-rpath,{shim_library.parent}"]
    if v.shim == "preload":
        extra_env["LD_PRELOAD"] = str(shim_library)
    built = build(tmp_path, "compute", ["compute.c"], ["compute_plus", "compute_clamp"],
                  cflags=list(v.cflags), ldflags=ldflags, with_shim=v.shim == "linked")

    report = check_json(built.binary)
    for name in ("compute", "other", "main"):
        f = checked_function(report, name)
        assert (f["site_form"], f["site_offset"]) == (v.form, v.site_offset), f
    f = checked_function(report, "compute")
    entry = entry_bytes(built.binary, f["addr"], f["site_offset"] + f["site_len"])
    assert entry.startswith(ENDBR64) == (v.site_offset == 4)
    assert entry[v.site_offset:].hex(" ").startswith(v.form)

    for mode in MODES:
        unpatched = run_program(built.binary, mode=mode, extra_env=extra_env)
        patched = run_program(built.binary, patches=str(built.patches["compute_plus"]), mode=mode,
                              extra_env=extra_env)
        assert (unpatched.clean, patched.clean) == (COMPUTE_UNPATCHED, COMPUTE_PLUS), mode
        # The original body starts after the site, wherever the form puts its end.
        wrapped = run_program(built.binary, "500", patches=str(built.patches["compute_clamp"]),
                              mode=mode, extra_env=extra_env)
        assert wrapped.clean == CLAMPED_500, mode
        if v.shim == "linked":
            assert patched.mode == mode
        elif v.shim == "shared":
            # The site list (__mcount_loc) is the program's; a shim outside the program
            # does not see it, so it dispatches through the table.
            assert patched.mode == "dispatch"


# ---- 5. no gmon.out -----------------------------------------------------------------------------


def test_no_gmon_out_is_written_by_instrumented_programs(compute: Built, tmp_path: Path,
                                                         shim_library: Path) -> None:
    """-pg is on compile lines only: the link uses Scrt1.o, so nothing writes gmon.out,
    with the shim, with a patch, or with no shim at all (glibc's own __fentry__)."""
    glibc = build_program([PROGRAMS / "compute.c"], tmp_path / "compute_glibc", with_shim=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    runs = [
        run_program(compute.binary, cwd=cwd),
        run_program(compute.binary, patches=str(compute.patches["compute_plus"]), cwd=cwd),
        run_program(compute.binary, patches=str(compute.patches["compute_plus"]), cwd=cwd,
                    mode="dispatch"),
        run_program(glibc, cwd=cwd),
        run_program(glibc, cwd=cwd, extra_env={"LD_PRELOAD": str(shim_library)}),
    ]
    for result in runs:
        assert result.returncode == 0, result
    assert list(cwd.iterdir()) == []


# ---- 6. a patch for another build ------------------------------------------------------------


@pytest.mark.slow
def test_stale_patch_is_refused_naming_both_build_ids(tmp_path: Path) -> None:
    old = build(tmp_path, "compute", ["compute.c"], ["compute_plus"], cflags=["-DVERSION=1"])
    old_id = check_json(old.binary)["build_id"]
    new = build_program([PROGRAMS / "compute.c"], tmp_path / "compute", cflags=["-DVERSION=2"])
    new_id = check_json(new)["build_id"]
    assert old_id != new_id

    so = old.patches["compute_plus"]
    result = run_program(new, patches=str(so))
    why = refusal(result, so)
    assert "another build" in why and old_id in why and new_id in why, why
    assert result.stdout == "v2 compute(21) = 42\nother(21) = 22\n"


# ---- 7. refused patch files ------------------------------------------------------------------


def test_truncated_patch_is_refused_and_the_program_runs_unpatched(compute: Built,
                                                                   tmp_path: Path) -> None:
    """Cut inside the loadable segments: the shim must refuse it, not let dlopen map
    pages past the end of the file (the first touch of one raises SIGBUS)."""
    data = compute.patches["compute_plus"].read_bytes()
    for size in (40, 200, len(data) // 8, len(data) // 2):
        so = tmp_path / f"cut{size}.so"
        so.write_bytes(data[:size])
        so.chmod(0o755)
        result = run_program(compute.binary, patches=str(so))
        assert result.returncode == 0, f"{size} of {len(data)} bytes: {result}"
        refusal(result, so)
        assert result.stdout == COMPUTE_UNPATCHED


@pytest.mark.parametrize("content", [b"not a shared object\n", b"#!/bin/sh\n" + b"x" * 8192,
                                     b"\x7fELF" + b"\0" * 4096],
                         ids=["short-text", "long-text", "elf-magic-then-zeros"])
def test_non_elf_file_named_so_is_refused(compute: Built, tmp_path: Path, content: bytes) -> None:
    so = tmp_path / "x.so"
    so.write_bytes(content)
    so.chmod(0o755)
    result = run_program(compute.binary, patches=str(so))
    refusal(result, so)
    assert result.stdout == COMPUTE_UNPATCHED


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o620], ids=oct)
def test_group_or_world_writable_patch_is_refused(compute: Built, tmp_path: Path, mode: int) -> None:
    so = tmp_path / "compute_plus.so"
    shutil.copy(compute.patches["compute_plus"], so)
    so.chmod(mode)
    result = run_program(compute.binary, patches=str(so))
    assert "writable by group or others" in refusal(result, so)
    assert result.stdout == COMPUTE_UNPATCHED


def test_symlink_to_a_patch_is_refused(compute: Built, tmp_path: Path) -> None:
    link = tmp_path / "link.so"
    link.symlink_to(compute.patches["compute_plus"])
    result = run_program(compute.binary, patches=str(link))
    assert "symbolic link" in refusal(result, link)
    assert result.stdout == COMPUTE_UNPATCHED


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_non_regular_x_so_in_a_patch_directory_is_refused(compute: Built, tmp_path: Path,
                                                          kind: str) -> None:
    """A FENTRY_PATCHES entry that is a directory is a directory of patches (even one
    named x.so); an x.so inside it that is not a regular file is refused."""
    d = tmp_path / "patches"
    d.mkdir()
    odd = d / "x.so"
    if kind == "directory":
        odd.mkdir()
    elif kind == "fifo":
        os.mkfifo(odd)  # opening it must not block: the program would hang before main
    else:
        odd.symlink_to(compute.patches["compute_plus"])
    result = run_program(compute.binary, patches=str(d))
    why = refusal(result, odd)
    assert ("symbolic link" if kind == "symlink" else "not a regular file") in why
    assert result.stdout == COMPUTE_UNPATCHED


def test_refused_patch_does_not_stop_the_next_one(compute: Built, tmp_path: Path) -> None:
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"junk")
    bad.chmod(0o755)
    result = run_program(compute.binary, patches=f"{bad}:{compute.patches['compute_plus']}")
    refusal(result, bad)
    assert result.stdout == COMPUTE_PLUS


def test_missing_patch_is_refused(compute: Built, tmp_path: Path) -> None:
    missing = tmp_path / "missing.so"
    result = run_program(compute.binary, patches=str(missing))
    assert "cannot open" in refusal(result, missing)
    assert result.stdout == COMPUTE_UNPATCHED


@pytest.mark.parametrize("mode", MODES)
def test_patch_whose_entry_bytes_differ_is_refused_naming_the_function(compute: Built,
                                                                      tmp_path: Path,
                                                                      mode: str) -> None:
    """The registration records the bytes at compute's entry; change its last one (the top
    byte of the call's displacement) by hand, as if the program had other code there."""
    reg = tmp_path / "edited.reg.c"
    run([sys.executable, "-m", "fentry_build.gen", "--binary", str(compute.binary),
         "--patch", str(PROGRAMS / "compute_plus.c"), "-o", str(reg)])
    text = reg.read_text()
    m = re.search(r"\.entry = \{ ([^}]*) \}", text)
    assert m is not None, text
    entry = [int(b, 16) for b in m.group(1).split(", ")]
    entry[-1] ^= 0xFF
    edited = ", ".join(f"0x{b:02x}" for b in entry)
    reg.write_text(text[:m.start(1)] + edited + text[m.end(1):])
    so = tmp_path / "edited.so"
    run(["gcc", "-O2", "-shared", "-fPIC", f"-I{paths.include_dir()}", "-o", str(so),
         str(PROGRAMS / "compute_plus.c"), str(reg)])
    so.chmod(0o755)

    result = run_program(compute.binary, patches=str(so), mode=mode)
    why = refusal(result, so)
    assert "compute" in why and "bytes at its entry differ" in why, why
    assert (result.mode, result.stdout) == (mode, COMPUTE_UNPATCHED)


# ---- 8. stacking ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, expected", [
    (("compute_plus", "compute_neg"), COMPUTE_NEG),
    (("compute_neg", "compute_plus"), COMPUTE_PLUS),
], ids=["plus-then-neg", "neg-then-plus"])
def test_later_patch_of_the_same_function_is_in_effect(compute: Built, order: tuple[str, str],
                                                       expected: str, mode: str) -> None:
    result = run_program(compute.binary, mode=mode,
                         patches=":".join(str(compute.patches[p]) for p in order))
    assert (result.mode, result.clean) == (mode, expected)


def test_patch_directory_is_applied_in_name_order(compute: Built, tmp_path: Path) -> None:
    d = tmp_path / "patches"
    d.mkdir()
    shutil.copy(compute.patches["compute_plus"], d / "2_plus.so")
    shutil.copy(compute.patches["compute_neg"], d / "10_neg.so")  # "10" < "2": applied first
    result = run_program(compute.binary, patches=str(d))
    assert result.clean == COMPUTE_PLUS


def test_same_patch_twice_is_applied_once(compute: Built) -> None:
    """The second time it is the version active already: nothing to do, no complaint."""
    so = compute.patches["compute_plus"]
    result = run_program(compute.binary, patches=f"{so}:{so}")
    assert "not loaded" not in result.stderr, result.stderr
    assert result.stdout == COMPUTE_PLUS


# ---- 9. calling the original ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arg, clamped, returned", [("500", 100, 200), ("7", 7, 14),
                                                    ("-3", -3, -6)])
def test_replacement_calls_the_original_body_without_recursing(compute: Built, arg: str,
                                                               clamped: int, returned: int,
                                                               mode: str) -> None:
    result = run_program(compute.binary, arg, patches=str(compute.patches["compute_clamp"]),
                         mode=mode)
    assert result.mode == mode
    assert result.clean == (
        f"compute_clamped({arg}): calling the original with {clamped}\n"
        f"v1 compute({arg}) = {returned}\n"
        f"other({arg}) = {int(arg) + 1}\n"
    )


def test_patch_stacked_on_a_wrapper_hides_it(compute: Built) -> None:
    """compute_neg applied after the wrapper is in effect; the wrapper is never entered."""
    patches = f"{compute.patches['compute_clamp']}:{compute.patches['compute_neg']}"
    result = run_program(compute.binary, "500", patches=patches)
    assert result.clean == "v1 compute(500) = -500\nother(500) = 501\n"


# ---- 10. threads --------------------------------------------------------------------------------

NTHREADS, CALLS = 4, 1_000_000  # as in threads.c


def thread_sums(per_call: int) -> list[str]:
    """What threads.c prints when compute(x) = per_call * x: for each caller t, the sums
    over x = t*CALLS .. t*CALLS+CALLS-1 of compute(x) and of other(x) = x + 1."""
    lines = []
    for t in range(NTHREADS + 1):
        xs = t * CALLS * CALLS + CALLS * (CALLS - 1) // 2
        lines.append(f"{t} {per_call * xs} {xs + CALLS}")
    return lines


@pytest.fixture(scope="module")
def threads(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("threads"), "threads", ["threads.c"], ["threads_patch"],
                 cflags=["-pthread"])


@pytest.mark.parametrize("mode", MODES)
def test_threads_unpatched(threads: Built, mode: str) -> None:
    result = run_program(threads.binary, mode=mode)
    assert (result.mode, result.clean.splitlines()) == (mode, thread_sums(2))


@pytest.mark.parametrize("mode", MODES)
def test_threads_calling_patched_and_unpatched_functions_concurrently(threads: Built,
                                                                      mode: str) -> None:
    for _ in range(3):
        result = run_program(threads.binary, patches=str(threads.patches["threads_patch"]),
                             mode=mode)
        assert (result.mode, result.clean.splitlines()) == (mode, thread_sums(3))
