"""patch-from-diff on real diffs, end to end: the fix as a source change, the generated patch
applied to the running unfixed program, and its answers compared with the fixed program's.

Everything is real: gcc builds the programs (with compile_commands.json as Meson and SCons
write it), git apply applies the diffs, libclang reads the sources, the generator checks
the patch with --strict, gcc builds it with -Wall -Wextra -Werror, and `fentry-build apply`
patches the running process.  The program is tests/programs/fromdiff/ (calc.c, util.c,
calc.h); the server example is built with Meson.
"""

from __future__ import annotations

import difflib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fentry_build import paths
from fentry_build.build import flags
from fentry_build.errors import FentryError
from fentry_build.build import patchlist
from fentry_build.generator.fromdiff.command import patch_from_diff
from fentry_build.generator.fromdiff.refusals import Refusal

from support.builds import (
    INSTRUMENT, PROGRAMS, build_shim_objects, copy_example, meson, meson_cmd, run, setup_and_compile,
)
from support.cli import CLI, package_env
from support.servers import ask, start as start_server

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("git") is None,
                                reason="needs gcc and git")

PROGRAM = PROGRAMS / "fromdiff"
SOURCES = ("calc.c", "util.c")
WERROR = ["-Wall", "-Wextra", "-Werror"]
TIMEOUT = 20.0

Edit = tuple[str, str, str]  # file, old text, new text


# ---- building ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shim_objects() -> list[Path]:
    return build_shim_objects()


def build_calc(root: Path, shim: list[Path], extra: list[str] | None = None) -> Path:
    """Build root/build/calc as a build system would, with root/build/compile_commands.json."""
    build = root / "build"
    build.mkdir(exist_ok=True)
    entries, objects = [], []
    for src in SOURCES:
        args = ["gcc", "-std=c11", "-O2", "-g", *INSTRUMENT, *WERROR, *(extra or []), "-I..",
                "-c", f"../{src}", "-o", f"{src}.o"]
        run(args, cwd=build)
        entries.append({"directory": str(build), "file": f"../{src}", "arguments": args,
                        "output": f"{src}.o"})
        objects.append(str(build / f"{src}.o"))
    run(["gcc", *flags.PROGRAM_LINK_ARGS, "-o", str(build / "calc"), *objects,
         *map(str, shim), "-lpthread", "-ldl"])
    (build / "compile_commands.json").write_text(json.dumps(entries, indent=1))
    return build / "calc"


def fixed_text(root: Path, edits: list[Edit]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for name, old, new in edits:
        text = texts.get(name, (root / name).read_text())
        assert old in text, f"{old!r} is not in {name}"
        texts[name] = text.replace(old, new, 1)
    return texts


def write_diff(root: Path, edits: list[Edit], out: Path) -> Path:
    """The fix as `git diff` writes it (a/ and b/ paths), made with difflib."""
    lines: list[str] = []
    for name, text in fixed_text(root, edits).items():
        lines += difflib.unified_diff((root / name).read_text().splitlines(keepends=True),
                                      text.splitlines(keepends=True), f"a/{name}", f"b/{name}")
    out.write_text("".join(lines))
    return out


def apply_edits(root: Path, edits: list[Edit]) -> None:
    for name, text in fixed_text(root, edits).items():
        (root / name).write_text(text)


def copy_program(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in PROGRAM.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def build_patch(binary: Path, patch_c: Path) -> Path:
    """What the project's build does: the generator with --strict, then gcc, warnings as errors."""
    reg = patch_c.with_suffix(".reg.c")
    run([sys.executable, "-m", "fentry_build.gen", "--strict", "--binary", str(binary),
         "--patch", str(patch_c), "-o", str(reg)])
    out = binary.parent / f"{patch_c.stem}.so"
    run(["gcc", "-std=c11", "-O2", "-g", "-shared", "-fPIC", *WERROR, f"-I{paths.include_dir()}",
         "-o", str(out), str(patch_c), str(reg)])
    return out


# ---- running -------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The package importable, no fentry settings: the control socket goes where a user's does
    (the same for the program and for `fentry-build apply`)."""
    return {k: v for k, v in package_env().items() if not k.startswith("FENTRY_") and k != "XDG_RUNTIME_DIR"}


@dataclass
class Running:
    proc: subprocess.Popen[bytes]

    def readline(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + TIMEOUT
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], "the program answered nothing"
            chunk = os.read(fd, 1)
            assert chunk, f"the program exited with status {self.proc.wait()}"
            data += chunk
        return data.decode().rstrip("\n")

    def ask(self, commands: list[str]) -> list[str]:
        assert self.proc.stdin is not None
        answers = []
        for c in commands:
            self.proc.stdin.write(c.encode() + b"\n")
            self.proc.stdin.flush()
            answers.append(self.readline())
        return answers

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start(binary: Path) -> Running:
    proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env(), cwd=binary.parent)
    running = Running(proc)
    assert running.readline() == "ready"
    return running


def apply_live(pid: int, patch: Path) -> None:
    proc = subprocess.run([*CLI, "apply", "--pid", str(pid), str(patch)], capture_output=True,
                          text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr


def answers(binary: Path, commands: list[str]) -> list[str]:
    running = start(binary)
    try:
        return running.ask(commands)
    finally:
        running.stop()


@dataclass
class Case:
    root: Path            # the project: original sources, build/ the running build
    binary: Path
    fixed_binary: Path


def make_case(tmp: Path, shim: list[Path], edits: list[Edit]) -> Case:
    root = copy_program(tmp / "project")
    binary = build_calc(root, shim)
    fixed = copy_program(tmp / "fixed")
    apply_edits(fixed, edits)
    return Case(root, binary, build_calc(fixed, shim))


def patched_matches_fixed(case: Case, patch: Path, before: list[str], after: list[str]) -> list[str]:
    """Run the unfixed program on `before`, apply `patch` live, run `after`: its answers to
    `after` must be the fixed program's (which ran `before` too, so state carries over)."""
    so = build_patch(case.binary, patch)
    running = start(case.binary)
    try:
        old_before = running.ask(before)
        apply_live(running.proc.pid, so)
        patched = running.ask(after)
    finally:
        running.stop()
    expected = answers(case.fixed_binary, before + after)
    assert old_before == expected[:len(before)], "the fix changes the answers to `before`: pick others"
    assert patched == expected[len(before):]
    return patched


def generate(case: Case, name: str, diff: Path) -> Path:
    result = patch_from_diff(name, case.binary, diff=diff, project=case.root)
    assert result.path == case.root / "patches" / f"{name}.c"
    return result.path


# ---- fixes -----------------------------------------------------------------------------------

ADD_FIX: list[Edit] = [("calc.c", "\tif (x > 0)\n\t\ttotal += x;", "\ttotal += x;")]


def test_one_line_fix_of_a_global_function(tmp_path: Path, shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, ADD_FIX)
    patch = generate(case, "fix_add", write_diff(case.root, ADD_FIX, tmp_path / "fix.diff"))
    text = patch.read_text()
    assert "FENTRY_REPLACE(add, add_fixed);" in text
    # The running total is the program's: referenced, never copied.
    assert 'FENTRY_REF(total, long, "calc.c");' in text
    assert "FENTRY_VAR(total) += x;" in text
    assert "static long total" not in text
    patched = patched_matches_fixed(case, patch, ["add 5", "add 7"], ["add -2", "add 1", "stats"])
    assert patched[:2] == ["10", "11"]  # 5 + 7 - 2: the program's total went on


SCALE_FIX: list[Edit] = [("calc.c", "return clamp(x) * SCALE;", "return clamp(x) * SCALE + 1;")]


@pytest.mark.slow
def test_fix_of_a_static_function_called_from_elsewhere(tmp_path: Path,
                                                        shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, SCALE_FIX)
    patch = generate(case, "fix_scale", write_diff(case.root, SCALE_FIX, tmp_path / "fix.diff"))
    text = patch.read_text()
    assert 'FENTRY_REPLACE(scale, scale_fixed, "calc.c");' in text
    assert "FENTRY_REPLACE(answer" not in text  # its caller did not change
    assert 'FENTRY_REF(limit, int, "calc.c");' in text
    patched_matches_fixed(case, patch, ["bound 2"], ["scale 2", "scale 500", "bound 3"])


CLAMP_FIX: list[Edit] = [("calc.c", "return x > limit ? limit : x;",
                          "return x > limit ? limit : x < 0 ? 0 : x;")]


def test_fix_of_a_static_inline_helper_replaces_its_callers(tmp_path: Path,
                                                            shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, CLAMP_FIX)
    patch = generate(case, "fix_clamp", write_diff(case.root, CLAMP_FIX, tmp_path / "fix.diff"))
    text = patch.read_text()
    # clamp has no body in the program (inlined everywhere): its callers are replaced, and
    # the patch carries the fixed clamp for them.
    assert 'FENTRY_REPLACE(scale, scale_fixed, "calc.c");' in text
    assert 'FENTRY_REPLACE(answer, answer_fixed, "calc.c");' in text
    assert "static inline int clamp(int x)\n{\n\treturn x > FENTRY_VAR(limit)" in text
    assert "FENTRY_REPLACE(clamp" not in text
    patched_matches_fixed(case, patch, ["scale 5", "bound 5"], ["scale -4", "bound -4", "scale 7"])


HELPER_FIX: list[Edit] = [
    ("calc.c", "long add(long x)\n{\n\tif (x > 0)\n\t\ttotal += x;",
     "static int valid(long x)\n{\n\treturn x > -1000 && x < 1000;\n}\n\n"
     "long add(long x)\n{\n\tif (valid(x))\n\t\ttotal += x;"),
]


@pytest.mark.slow
def test_fix_adding_a_new_static_helper_carries_it(tmp_path: Path, shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, HELPER_FIX)
    patch = generate(case, "fix_valid", write_diff(case.root, HELPER_FIX, tmp_path / "fix.diff"))
    text = patch.read_text()
    assert "static int valid(long x)\n{" in text
    assert "FENTRY_REPLACE(valid" not in text and "FENTRY_REF(valid" not in text
    patched_matches_fixed(case, patch, ["add 3"], ["add -3", "add 5000", "add 1"])


WORD_FIX: list[Edit] = [("util.c", "\tif (letters == (int)n)", "\tif (n > 0 && letters == (int)n)")]


@pytest.mark.slow
def test_fix_touching_a_static_local_references_the_programs(tmp_path: Path,
                                                             shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, WORD_FIX)
    patch = generate(case, "fix_word", write_diff(case.root, WORD_FIX, tmp_path / "fix.diff"))
    text = patch.read_text()
    assert "FENTRY_REPLACE(word_class, word_class_fixed);" in text
    assert 'FENTRY_REF(seen, int, "util.c");' in text
    assert "FENTRY_VAR(seen)++;" in text
    # The count of words seen goes on from the program's: 2 words before, then 3rd, 4th.
    patched = patched_matches_fixed(case, patch, ["word abc", "word 12"], ["word ab", "word "])
    assert patched[0] == "31"


NAMES_FIX: list[Edit] = [("calc.c", '{"zero", "one", "two"}', '{"zero", "one", "two", "three"}'),
                         ("calc.c", "n < 3 ? names[n]", "n < 4 ? names[n]")]


@pytest.mark.slow
def test_fix_of_constant_data_carries_the_new_table(tmp_path: Path, shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, NAMES_FIX)
    patch = generate(case, "fix_names", write_diff(case.root, NAMES_FIX, tmp_path / "fix.diff"))
    text = patch.read_text()
    # Read-only data: the patch has its own new table, and the code reading it is replaced.
    assert 'static const char *const names[] = {"zero", "one", "two", "three"};' in text
    assert "FENTRY_REF(names" not in text
    # count() is carried (inlined into answer); its macro names the program's stats.
    assert "#define COUNT_ERROR() (FENTRY_VAR(stats).errors++)" in text
    patched_matches_fixed(case, patch, ["name 1", "nope"], ["name 3", "name 2", "name 9", "nix", "stats"])


# ---- the fix already applied to the project (git diff in the fixed working tree) ----------


@pytest.mark.slow
def test_diff_already_applied_to_the_project_is_taken_in_reverse(tmp_path: Path,
                                                                 shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, ADD_FIX)
    diff = write_diff(case.root, ADD_FIX, tmp_path / "fix.diff")
    apply_edits(case.root, ADD_FIX)  # the user committed the fix; build/ is the running build
    proc = subprocess.run([*CLI, "patch-from-diff", "fix_add", "--diff",
                           str(diff), "--binary", str(case.binary), "--project", str(case.root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "replaces add (calc.c)" in proc.stdout
    patched_matches_fixed(case, case.root / "patches" / "fix_add.c", ["add 1"], ["add -1"])


@pytest.mark.slow
def test_fixed_tree_instead_of_a_diff(tmp_path: Path, shim_objects: list[Path]) -> None:
    case = make_case(tmp_path, shim_objects, SCALE_FIX)
    result = patch_from_diff("fix_scale", case.binary, fixed_tree=tmp_path / "fixed",
                             project=case.root)
    patched_matches_fixed(case, result.path, [], ["scale 9"])


# ---- refusals --------------------------------------------------------------------------------


def refusal(tmp_path: Path, shim: list[Path], edits: list[Edit]) -> str:
    root = copy_program(tmp_path / "project")
    binary = build_calc(root, shim)
    diff = write_diff(root, edits, tmp_path / "fix.diff")
    with pytest.raises(Refusal) as e:
        patch_from_diff("fix", binary, diff=diff, project=root)
    assert not (root / "patches" / "fix.c").exists()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_changed_struct_layout_is_refused(tmp_path: Path, shim_objects: list[Path]) -> None:
    message = refusal(tmp_path, shim_objects, [
        ("calc.c", "\tlong errors;\n};", "\tlong errors;\n\tlong unknown;\n};"),
        ("calc.c", "\tstats.commands++;", "\tstats.commands++, stats.unknown++;"),
    ])
    assert message.startswith("struct stats changed")
    assert "the variable stats in calc.c" in message and "shadow variable" in message


def test_changed_initializer_is_refused(tmp_path: Path, shim_objects: list[Path]) -> None:
    message = refusal(tmp_path, shim_objects, [("calc.c", "static int limit = 100;",
                                                "static int limit = 50;")])
    assert message.startswith("the initial value of limit (calc.c) changed")
    assert "FENTRY_POST_PATCH" in message


def test_new_global_variable_is_refused(tmp_path: Path, shim_objects: list[Path]) -> None:
    message = refusal(tmp_path, shim_objects, [
        ("calc.c", "long add(long x)\n{\n", "long adds;\n\nlong add(long x)\n{\n\tadds++;\n"),
    ])
    assert message.startswith("the fix adds the global variable adds (calc.c)")
    assert "shadow variable" in message


def test_changed_function_without_fentry_site_is_refused(tmp_path: Path,
                                                         shim_objects: list[Path]) -> None:
    message = refusal(tmp_path, shim_objects, [("calc.c", "sum * 31", "sum * 37")])
    assert message.startswith("the fix changes checksum (calc.c), which has no fentry site in calc")


def test_change_only_in_a_header_used_by_many_units_is_refused(tmp_path: Path,
                                                               shim_objects: list[Path]) -> None:
    message = refusal(tmp_path, shim_objects, [("calc.h", "#define WORD_MAX 16", "#define WORD_MAX 8")])
    assert message.startswith("the fix changes only calc.h, which changes code in 2 translation units")
    assert "calc.c: answer" in message and "util.c: word_class" in message


def test_changed_signature_is_refused(tmp_path: Path, shim_objects: list[Path]) -> None:
    message = refusal(tmp_path, shim_objects, [
        ("calc.c", "static int bound(int x)\n{\n\treturn clamp(x) + 1;",
         "static int bound(long x)\n{\n\treturn clamp((int)x) + 1;"),
        ("calc.c", "__attribute__((noinline, noclone)) static int scale(int x)",
         "__attribute__((noinline, noclone)) static int scale(long x)"),
        ("calc.c", "return clamp(x) * SCALE;", "return clamp((int)x) * SCALE;"),
    ])
    assert message.startswith("the fix changes the type of scale from int (int) to int (long)")


def test_a_diff_that_does_not_apply_says_so(tmp_path: Path, shim_objects: list[Path]) -> None:
    root = copy_program(tmp_path / "project")
    binary = build_calc(root, shim_objects)
    diff = write_diff(root, ADD_FIX, tmp_path / "fix.diff")
    (root / "calc.c").write_text((root / "calc.c").read_text().replace("total += x;", "total -= x;"))
    with pytest.raises(FentryError, match="applies to .* neither forward"):
        patch_from_diff("fix", binary, diff=diff, project=root)


# ---- the command line and the patch list ---------------------------------------------------


def test_cli_error_is_one_line_and_writes_nothing(tmp_path: Path, shim_objects: list[Path]) -> None:
    root = copy_program(tmp_path / "project")
    binary = build_calc(root, shim_objects)
    diff = write_diff(root, [("calc.c", "static int limit = 100;", "static int limit = 7;")],
                      tmp_path / "fix.diff")
    proc = subprocess.run([*CLI, "patch-from-diff", "fix", "--diff", str(diff), "--binary",
                           str(binary), "--project", str(root)], capture_output=True, text=True,
                          timeout=300, env=_env())
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("fentry-build: error: the initial value of limit (calc.c) changed")
    assert not (root / "patches").exists()


def test_sconstruct_patches_dict_gets_the_entry(tmp_path: Path) -> None:
    sconstruct = tmp_path / "SConstruct"
    shutil.copy(paths.examples_dir() / "hello" / "SConstruct", sconstruct)
    before = sconstruct.read_text()
    assert "patches={'my_patch': 'patches/my_patch.c'}" in before
    assert patchlist.names(tmp_path) == ["my_patch"]
    registration = patchlist.register(tmp_path, "fix_cve", tmp_path / "hello")
    assert registration.updated and registration.build_file == sconstruct
    assert sconstruct.read_text() == before.replace(
        "patches={'my_patch': 'patches/my_patch.c'}",
        "patches={'my_patch': 'patches/my_patch.c', 'fix_cve': 'patches/fix_cve.c'}")
    assert patchlist.names(tmp_path) == ["my_patch", "fix_cve"]


# ---- the server example (Meson, -O2: GCC inlines and clones) ---------------------------------

PARSE_FIX: list[Edit] = [(
    "parser.c",
    "\t\tif (parse_number(p, n, &req->numbers[req->nnumbers]) < 0)\n"
    "\t\t\treturn fail(err, errlen, \"not a number: '%.*s'\", (int)(n > 24 ? 24 : n), p);\n"
    "\t\treq->nnumbers++;\n"
    "\t\t/* The array is full: there is no room for another number. */\n"
    "\t\tif (req->nnumbers == MAX_NUMBERS)\n"
    "\t\t\treturn fail(err, errlen, \"too many numbers (at most %d)\", MAX_NUMBERS);\n",
    "\t\tif (req->nnumbers == MAX_NUMBERS)\n"
    "\t\t\treturn fail(err, errlen, \"too many numbers (at most %d)\", MAX_NUMBERS);\n"
    "\t\tif (parse_number(p, n, &req->numbers[req->nnumbers]) < 0)\n"
    "\t\t\treturn fail(err, errlen, \"not a number: '%.*s'\", (int)(n > 24 ? 24 : n), p);\n"
    "\t\treq->nnumbers++;\n",
)]
ANSWER_FIX: list[Edit] = [("server.c", "count_request(0); /* the bug: should be count_request(1) */",
                           "count_request(1);")]


def build_server(dest: Path, edits: list[Edit]) -> Path:
    project = copy_example("server", dest)
    apply_edits(project, edits)
    setup_and_compile(project, "-Dbuildtype=debugoptimized")
    return project


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/server built as a user builds it, optimised, with compile_commands.json."""
    return build_server(tmp_path_factory.mktemp("server") / "server", [])


def server_matches_fixed(project: Path, fixed: Path, patch: str, before: list[str],
                         after: list[str]) -> list[str]:
    env = {**os.environ, "FENTRY_STRICT": "1"}
    meson("setup", "--reconfigure", "build", cwd=project)  # meson.build has the new patch
    proc = subprocess.run([*meson_cmd(), "compile", "-C", "build", patch], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stdout.lower(), proc.stdout
    results = []
    for binary, so in ((project / "build" / "server", project / "build" / f"{patch}.so"),
                       (fixed / "build" / "server", None)):
        srv = start_server(binary)
        try:
            first = [ask(srv.port, r) for r in before]
            if so is not None:
                apply_live(srv.pid, so)
            results.append((first, [ask(srv.port, r) for r in after]))  # each a new connection
        finally:
            srv.stop()
    (old_first, patched), (fixed_first, expected) = results
    assert old_first == fixed_first
    assert patched == expected
    return patched


@pytest.mark.slow
def test_server_fix_of_the_global_parse_request(server: Path, tmp_path: Path) -> None:
    diff = write_diff(server, PARSE_FIX, tmp_path / "fix.diff")
    result = patch_from_diff("fix_parse_generated", server / "build" / "server", diff=diff,
                             project=server)
    text = result.path.read_text()
    assert "FENTRY_REPLACE(parse_request, parse_request_fixed);" in text
    assert "'fix_parse_generated': 'patches/fix_parse_generated.c'" in (server / "meson.build").read_text()
    fixed = build_server(tmp_path / "fixed", PARSE_FIX)
    patched = server_matches_fixed(server, fixed, "fix_parse_generated", ["SUM 1 2 3"],
                                   ["SUM 1 2 3 4 5 6 7 8", "SUM 1 2 3 4 5 6 7 8 9", "SUM 1 x", "PING"])
    assert patched[0] == "OK 36"


@pytest.mark.slow
def test_server_fix_of_a_static_function_touching_static_state(server: Path, tmp_path: Path) -> None:
    diff = write_diff(server, ANSWER_FIX, tmp_path / "fix.diff")
    result = patch_from_diff("fix_answer_generated", server / "build" / "server", diff=diff,
                             project=server)
    text = result.path.read_text()
    # The statistics are the running server's, referenced; answer's code is the fixed one.
    assert 'FENTRY_REF(stats, struct server_stats, "server.c");' in text
    assert 'FENTRY_REF(stats_lock, pthread_mutex_t, "server.c");' in text
    assert "static struct server_stats stats" not in text
    fixed = build_server(tmp_path / "fixed", ANSWER_FIX)
    patched = server_matches_fixed(server, fixed, "fix_answer_generated", ["PING", "SUM 1 2", "STATS"],
                                   ["SUM x", "STATS", "NOPE", "SUM 3", "STATS"])
    assert patched[1] == "OK requests=3 errors=1"


@pytest.mark.slow
def test_server_built_with_scons(tmp_path: Path) -> None:
    """The same fix in an SCons project, the way docs/patch-authoring.md says: SCons writes
    compile_commands.json (its compilation_db tool), patch-from-diff registers the patch in
    the SConstruct, `scons patches` builds it, and it fixes the running server."""
    project = tmp_path / "server"
    shutil.copytree(paths.examples_dir() / "server", project,
                    ignore=shutil.ignore_patterns("build*", "subprojects"))
    sconstruct = project / "SConstruct"
    text = sconstruct.read_text()
    assert "tools=['default', " in text
    sconstruct.write_text(text.replace("tools=['default', ", "tools=['default', 'compilation_db', ")
                          + "env.Default(env.CompilationDatabase())\n")
    scons = [sys.executable, "-m", "SCons", "-Q"]
    run([*scons], cwd=project)
    assert (project / "compile_commands.json").is_file()
    diff = write_diff(project, PARSE_FIX, tmp_path / "fix.diff")
    made = subprocess.run([*CLI, "patch-from-diff", "fix_parse_scons", "--diff", str(diff),
                           "--binary", "server"], cwd=project, env=package_env(),
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    assert "FENTRY_REPLACE(parse_request, parse_request_fixed);" in (
        project / "patches" / "fix_parse_scons.c").read_text()
    assert "'fix_parse_scons': 'patches/fix_parse_scons.c'" in sconstruct.read_text()
    built = subprocess.run([*scons, "patches"], cwd=project, env={**os.environ, "FENTRY_STRICT": "1"},
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "warning" not in (built.stdout + built.stderr).lower()
    srv = start_server(project / "server")
    try:
        assert ask(srv.port, "SUM 1 2 3 4 5 6 7 8").startswith("ERR too many numbers")
        apply_live(srv.pid, project / "fix_parse_scons.so")
        assert ask(srv.port, "SUM 1 2 3 4 5 6 7 8") == "OK 36"
        assert ask(srv.port, "SUM 1 2 3 4 5 6 7 8 9").startswith("ERR too many numbers")
    finally:
        srv.stop()
