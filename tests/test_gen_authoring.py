"""Patch authoring on real gcc builds, no mocks: FENTRY_REF, callbacks and FENTRY_REPLACE_ALL in
the generator, the inlined-copy and IPA-clone analysis (warnings, --strict, FENTRY_STRICT), and
`fentry-build new-patch` (prototypes from DWARF, the skeleton, meson.build).

The C programs are tests/programs/authoring_*.c.  Where a test needs a behaviour of gcc
(inlining, cloning) it first checks the symbols gcc produced and skips with what it saw
when this gcc decided otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from fentry_build import paths
from fentry_build.binary.elf import read_binary
from fentry_build.binary.ipaclones import DUMP_SUFFIX
from fentry_build.build.flags import PROGRAM_LINK_ARGS
from fentry_build.build import meson_init
from fentry_build.errors import FentryError
from fentry_build.generator import main as gen
from fentry_build.generator import newpatch
from fentry_build.generator.scan import PatchCompile

from support.builds import INSTRUMENT, PROGRAMS, build_patch, build_program, run
from support.patches import scan_text
from support.cli import python

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

TIMEOUT = 60
WERROR = ["-Wall", "-Wextra", "-Werror"]


# ---- helpers ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def copy_programs(dest: Path, *names: str) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(PROGRAMS / n, dest / n)) for n in names]


def symbol(binary: Path, name: str) -> tuple[int, int]:
    """(st_value, st_size) of the one symbol `name` in binary's .symtab."""
    with open(binary, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        (sym,) = symtab.get_symbol_by_name(name) or []
        return sym["st_value"], sym["st_size"]


def function_names(binary: Path) -> set[str]:
    return {f.name for f in read_binary(binary).functions}


def generate(binary: Path, patch: Path, **kw: object) -> tuple[str, list[str]]:
    warnings: list[str] = []
    return gen.generate(binary, patch, warnings.append, **kw), warnings  # type: ignore[arg-type]


def generate_error(binary: Path, patch: Path, **kw: object) -> str:
    with pytest.raises(FentryError) as e:
        gen.generate(binary, patch, lambda m: None, **kw)  # type: ignore[arg-type]
    message = str(e.value)
    assert "\n" not in message
    return message


def gen_cli(binary: Path, patch: Path, out: Path, *args: str,
            **env: str) -> subprocess.CompletedProcess[str]:
    return python("-m", "fentry_build.gen", "--binary", str(binary), "--patch", str(patch),
                  "-o", str(out), *args, timeout=TIMEOUT, **env)


def link_patch(patch: Path, reg_text: str, out: Path) -> Path:
    reg = write(out.with_suffix(".reg.c"), reg_text)
    run(["gcc", "-O2", *WERROR, "-fPIC", "-shared", f"-I{paths.include_dir()}", "-o", str(out),
         str(patch), str(reg)])
    return out


def descriptor_words(so: Path) -> dict[str, int]:
    """flags and nrefs of the fentry_patch a patch .so exports (struct fentry_patch layout)."""
    with open(so, "rb") as stream:
        elf = ELFFile(stream)
        dynsym = elf.get_section_by_name(".dynsym")
        assert isinstance(dynsym, SymbolTableSection)
        (sym,) = dynsym.get_symbol_by_name("fentry_patch") or []
        sec = elf.get_section(sym["st_shndx"])
        data = sec.data()[sym["st_value"] - sec["sh_addr"]:][: sym["st_size"]]
    # abi, nfuncs, target (8), build_id_len, build_id[64], pad, funcs (8), flags, nrefs
    nfuncs, = struct.unpack_from("<I", data, 4)
    flags, nrefs = struct.unpack_from("<II", data, 96)
    return {"nfuncs": nfuncs, "flags": flags, "nrefs": nrefs}


def run_program(binary: Path, *args: str, patches: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_") and k != "LD_PRELOAD"}
    env["FENTRY_CONTROL"] = "0"
    if patches is not None:
        env["FENTRY_PATCHES"] = patches
    return subprocess.run([str(binary), *args], cwd=binary.parent, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


# ---- FENTRY_REF -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refs_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """authoring_refs.c + authoring_refs_b.c, with the shim, -O2 -g."""
    d = tmp_path_factory.mktemp("refs")
    sources = copy_programs(d, "authoring_refs.c", "authoring_refs_b.c")
    return build_program(sources, d / "refs")


REPLACE_OTHER = "static int other_fixed(int x) { return x; }\nFENTRY_REPLACE(other, other_fixed);\n"


def ref_patch(tmp_path: Path, refs: str, body: str = REPLACE_OTHER) -> Path:
    return write(tmp_path / "p.c", "#include <stddef.h>\n#include <fentry.h>\n" + refs + body)


def test_refs_resolve_statics_globals_functions_and_static_locals(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, 'FENTRY_REF(served, long);\nFENTRY_REF(limit, int);\n'
                      'FENTRY_REF(log_line, void (const char *));\nFENTRY_REF(calls, int);\n'
                      'int use(void) { FENTRY_VAR(log_line)("x"); '
                      'return (int)FENTRY_VAR(served) + FENTRY_VAR(limit) + FENTRY_VAR(calls); }\n')
    reg, warnings = generate(refs_prog, patch)
    assert warnings == []
    entries = re.findall(r'\.name = "([^"]+)",\s*\.file = ([^,]+),\s*\.addr = (0x[0-9a-f]+),\s*'
                         r'\.size = (\d+),\s*\.slot = \(void \*\*\)&fentry_ref__(\w+),', reg)
    expected = []
    for name, file, slot in (("served", '"authoring_refs.c"', "served"), ("limit", "NULL", "limit"),
                             ("log_line", '"authoring_refs.c"', "log_line"),
                             ("calls.0", '"authoring_refs.c"', "calls")):
        addr, size = symbol(refs_prog, name)
        expected.append((name, file, f"0x{addr:x}", str(size), slot))
    assert entries == expected
    assert ".nrefs = 4," in reg and ".refs = fentry_refs," in reg
    assert 'extern void *fentry_ref__served;' in reg
    assert "pun" in reg  # the comment explaining the void * declaration
    so = link_patch(patch, reg, tmp_path / "p.so")
    assert descriptor_words(so) == {"nfuncs": 1, "flags": 0, "nrefs": 4}


def test_no_refs_means_zero_and_null(refs_prog: Path, tmp_path: Path) -> None:
    reg, _ = generate(refs_prog, ref_patch(tmp_path, ""))
    assert ".nrefs = 0," in reg and ".refs = NULL," in reg and "fentry_refs[]" not in reg


def test_ref_type_with_parentheses_and_commas_is_one_argument() -> None:
    patch = scan_text('FENTRY_REPLACE(a, b);\n'
                      'FENTRY_REF(cb, int (int, const char *), "x.c");\n'
                      'FENTRY_REF(table, struct entry *[4]);\nFENTRY_REF(fp, void (*)(int, long));\n',
                      name="p.c")
    assert [(r.name, r.type, r.file, r.line) for r in patch.refs] == [
        ("cb", "int (int, const char *)", "x.c", 2), ("table", "struct entry *[4]", None, 3),
        ("fp", "void (*)(int, long)", None, 4)]


def test_unresolved_ref_suggests_close_names(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, "\nFENTRY_REF(servd, long);\n")
    message = generate_error(refs_prog, patch)
    assert message.startswith(f"{patch}:4: no variable or function servd in refs")
    assert "did you mean served" in message and "FENTRY_REF(servd, long)" in message


def test_unresolved_ref_without_close_names(refs_prog: Path, tmp_path: Path) -> None:
    message = generate_error(refs_prog, ref_patch(tmp_path, "FENTRY_REF(qqqqzz, long);\n"))
    assert "no variable or function qqqqzz in refs" in message and "first argument" in message


def test_ambiguous_ref_lists_the_files(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, "FENTRY_REF(state, int);\n")
    message = generate_error(refs_prog, patch)
    assert message.startswith(f"{patch}:3: state is ambiguous in refs: 2 symbols")
    assert "a static variable in authoring_refs.c" in message
    assert "a static variable in authoring_refs_b.c" in message
    assert 'FENTRY_REF(state, int, "authoring_refs.c")' in message


def test_qualified_ref_picks_the_file(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, 'FENTRY_REF(state, int, "src/authoring_refs_b.c");\n')
    reg, _ = generate(refs_prog, patch)
    with open(refs_prog, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        addrs = [s["st_value"] for s in symtab.get_symbol_by_name("state") or []]
    assert len(addrs) == 2
    (addr,) = re.findall(r"\.addr = (0x[0-9a-f]+),\s*\.size = 4,\s*\.slot", reg)
    assert int(addr, 16) in addrs and '.file = "authoring_refs_b.c"' in reg
    link_patch(patch, reg, tmp_path / "p.so")


def test_ref_qualifier_that_matches_nothing(refs_prog: Path, tmp_path: Path) -> None:
    message = generate_error(refs_prog, ref_patch(tmp_path, 'FENTRY_REF(served, long, "nope.c");\n'))
    assert 'no variable or function served of file "nope.c" in refs' in message
    assert "served is a static variable in authoring_refs.c" in message
    assert "third argument" in message


def test_qualified_global_ref_uses_dwarf_for_its_file(refs_prog: Path, tmp_path: Path) -> None:
    reg, _ = generate(refs_prog, ref_patch(tmp_path, 'FENTRY_REF(limit, int, "authoring_refs.c");\n'))
    assert '.name = "limit",' in reg and ".file = NULL," in reg  # a global: matched, no file
    message = generate_error(refs_prog, ref_patch(tmp_path, 'FENTRY_REF(limit, int, "b.c");\n'))
    assert "limit is a global variable in" in message and "authoring_refs.c" in message


def test_variable_optimised_away_has_no_symbol(refs_prog: Path, tmp_path: Path) -> None:
    message = generate_error(refs_prog, ref_patch(tmp_path, "FENTRY_REF(folded, const int);\n"))
    assert "folded is a variable of" in message and "authoring_refs.c" in message
    assert "has no symbol in refs (optimised away?)" in message


def test_thread_local_ref_is_refused(refs_prog: Path, tmp_path: Path) -> None:
    message = generate_error(refs_prog, ref_patch(tmp_path, "FENTRY_REF(per_thread, int);\n"))
    assert "per_thread is a thread-local (__thread) variable" in message
    assert "does not support thread-local" in message


def test_ref_to_a_function_gcc_only_cloned(tmp_path: Path) -> None:
    src = write(tmp_path / "c.c", "#include <stdio.h>\nstatic __attribute__((noinline)) void say"
                "(const char *s, int n) { printf(\"%s %d\\n\", s, n); }\n"
                "int main(void) { say(\"a\", 1); say(\"b\", 1); return 0; }\n")
    prog = build_program([src], tmp_path / "c", with_shim=False)
    if "say" in function_names(prog):
        pytest.skip(f"gcc kept say whole: {sorted(function_names(prog))}")
    message = generate_error(prog, write(tmp_path / "p.c", "#include <fentry.h>\n"
                                         "FENTRY_REF(say, void (const char *, int));\n"
                                         "static int m(void) { return 0; }\nFENTRY_REPLACE(main, m);\n"))
    assert "say has no body of its own" in message and "say.constprop.0" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("FENTRY_REF(a);", "p.c:2:"),  # the preprocessor: FENTRY_REF needs a type
    ("FENTRY_REF(a, int, \"x.c\", 4);", "the third argument of FENTRY_REF must be the source file"),
    ("FENTRY_REF(a + 1, int);", "p.c:2:"),  # the compiler: fentry_ref__a + 1 declares nothing
    ("FENTRY_REF(a, int, x.c);", "the third argument of FENTRY_REF must be the source file"),
    ("FENTRY_REF(a, int);\nFENTRY_REF(b, long, \"b.c\");\nFENTRY_REF(b, long);",
     "p.c:4: FENTRY_REF(b, long) references b again (line 3"),
    ("FENTRY_REF(b, long);\nFENTRY_REF(b, int);", "p.c:3: FENTRY_REF(b, ...) references b again"),
    ("int f(void) { return FENTRY_VAR(zz); }", "p.c:2: FENTRY_VAR(zz) but the patch has no FENTRY_REF(zz, type)"),
    ("FENTRY_REF(a, int", "p.c:2:"),
])
def test_ref_scan_errors(text: str, expected: str) -> None:
    with pytest.raises(FentryError) as e:
        scan_text("FENTRY_REPLACE(f, g);\n" + text, name="p.c")  # text starts on line 2
    assert expected in str(e.value) and "\n" not in str(e.value)


# ---- callbacks and FENTRY_REPLACE_ALL ---------------------------------------------------------

CALLBACKS_C = """
static int pre(char *why, size_t len) { (void)why; (void)len; return 0; }
static void post(void) {}
static void pre_un(void) {}
static void post_un(void) {}
"""


def test_callbacks_present_and_absent(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, CALLBACKS_C + "FENTRY_PRE_PATCH(pre);\nFENTRY_POST_UNPATCH(post_un);\n"
                      "void unused(void) { post(); pre_un(); }\n")
    reg, _ = generate(refs_prog, patch)
    assert "extern const fentry_pre_patch_fn fentry_cb__pre_patch;" in reg
    assert "extern const fentry_callback_fn fentry_cb__post_unpatch;" in reg
    assert ".pre_patch = &fentry_cb__pre_patch," in reg and ".post_unpatch = &fentry_cb__post_unpatch," in reg
    assert ".post_patch = NULL," in reg and ".pre_unpatch = NULL," in reg
    assert "fentry_cb__post_patch;" not in reg
    assert ".flags = 0," in reg
    link_patch(patch, reg, tmp_path / "p.so")


def test_all_callbacks_and_replace_all(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, CALLBACKS_C + "FENTRY_PRE_PATCH(pre);\nFENTRY_POST_PATCH(post);\n"
                      "FENTRY_PRE_UNPATCH(pre_un);\nFENTRY_POST_UNPATCH(post_un);\nFENTRY_REPLACE_ALL();\n")
    reg, _ = generate(refs_prog, patch)
    for field in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch"):
        assert f".{field} = &fentry_cb__{field}," in reg
    assert ".flags = FENTRY_PATCH_REPLACE_ALL," in reg
    so = link_patch(patch, reg, tmp_path / "p.so")
    assert descriptor_words(so)["flags"] == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("FENTRY_PRE_PATCH(a);\nFENTRY_PRE_PATCH(b);", "p.c:3: FENTRY_PRE_PATCH appears twice (line 2"),
    ("FENTRY_POST_UNPATCH(a);\n\nFENTRY_POST_UNPATCH(a);", "p.c:4: FENTRY_POST_UNPATCH appears twice"),
    ("FENTRY_REPLACE_ALL();\nFENTRY_REPLACE_ALL();", "p.c:3: FENTRY_REPLACE_ALL appears twice"),
    ("FENTRY_REPLACE_ALL(1);", "p.c:2:"),  # the preprocessor: it takes no arguments
    ("FENTRY_POST_PATCH();", "FENTRY_POST_PATCH takes the name of one function"),
    ("FENTRY_PRE_UNPATCH(a, b);", "p.c:2:"),  # the preprocessor: it takes one
    ("FENTRY_PRE_PATCH(&a);", "FENTRY_PRE_PATCH takes the name of one function"),
])
def test_callback_scan_errors(text: str, expected: str) -> None:
    with pytest.raises(FentryError) as e:
        scan_text("FENTRY_REPLACE(f, g);\n" + text, name="p.c")
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_one_of_each_callback_and_a_comment_are_fine() -> None:
    patch = scan_text("FENTRY_REPLACE(f, g);\n/* FENTRY_PRE_PATCH(x); */\nFENTRY_PRE_PATCH(a);\n"
                      "FENTRY_POST_PATCH(b);\n#if 0\nFENTRY_REPLACE_ALL();\n#endif\n", name="p.c")
    assert [(c.macro, c.name, c.line) for c in patch.callbacks] == [
        ("FENTRY_PRE_PATCH", "a", 3), ("FENTRY_POST_PATCH", "b", 4)]
    assert not patch.replace_all and patch.callback("pre_unpatch") is None


# ---- refs and callbacks at run time -------------------------------------------------------------

RUNTIME_PATCH = r"""
#include <stdio.h>
#include <fentry.h>

FENTRY_REF(served, long);
FENTRY_REF(limit, int);
FENTRY_REF(log_line, void (const char *));
FENTRY_REF(calls, int);

static int handle_fixed(int x)
{
	FENTRY_VAR(served) += 1000;
	FENTRY_VAR(log_line)("patched");
	return x + FENTRY_VAR(limit) + FENTRY_VAR(calls);
}
FENTRY_REPLACE(handle, handle_fixed);

static int pre(char *why, size_t len)
{
	(void)why; (void)len;
	printf("pre_patch: limit %d\n", FENTRY_VAR(limit));
	return 0;
}
static void post(void) { puts("post_patch"); }
FENTRY_PRE_PATCH(pre);
FENTRY_POST_PATCH(post);
"""

VETO_PATCH = r"""
#include <stdio.h>
#include <fentry.h>

static int handle_fixed(int x) { return -x; }
FENTRY_REPLACE(handle, handle_fixed);

static int veto(char *why, size_t len)
{
	snprintf(why, len, "not today");
	return 1;
}
FENTRY_PRE_PATCH(veto);
"""

OTHER_PATCH = r"""
#include <fentry.h>
static int other_fixed(int x) { return x * 100; }
FENTRY_REPLACE(other, other_fixed);
"""


def test_refs_and_callbacks_work_in_the_running_program(refs_prog: Path, tmp_path: Path) -> None:
    plain = run_program(refs_prog, "5")
    assert plain.returncode == 0, plain.stderr
    assert "handle(5) = 48\nhandle(5) = 49\n" in plain.stdout  # 5 + 42 + calls
    so = build_patch(refs_prog, write(tmp_path / "fix.c", RUNTIME_PATCH), tmp_path / "fix.so",
                     cflags=WERROR)
    patched = run_program(refs_prog, "5", patches=str(so))
    assert (patched.returncode, patched.stderr) == (0, "")
    lines = patched.stdout.splitlines()
    assert lines[:2] == ["pre_patch: limit 10", "post_patch"]
    assert lines.count("log: patched") == 2
    assert "handle(5) = 15" in lines  # 5 + limit 10 + calls 0: the original never ran
    assert "served 2000, state 1, state_b 105, threads 0" in lines


def test_a_vetoing_pre_patch_leaves_the_program_alone(refs_prog: Path, tmp_path: Path) -> None:
    so = build_patch(refs_prog, write(tmp_path / "veto.c", VETO_PATCH), tmp_path / "veto.so",
                     cflags=WERROR)
    result = run_program(refs_prog, "5", patches=str(so))
    assert result.returncode == 0
    assert "handle(5) = 48" in result.stdout and "not today" in result.stderr


def test_replace_all_reverts_the_earlier_patch(refs_prog: Path, tmp_path: Path) -> None:
    first = build_patch(refs_prog, write(tmp_path / "a_other.c", OTHER_PATCH), tmp_path / "a_other.so")
    cumulative = build_patch(refs_prog, write(tmp_path / "b_all.c", VETO_PATCH.split("static int veto")[0]
                                              + "FENTRY_REPLACE_ALL();\n"), tmp_path / "b_all.so")
    both = run_program(refs_prog, "5", patches=f"{first}:{cumulative}")
    assert both.returncode == 0, both.stderr
    assert "handle(5) = -5" in both.stdout and "other(5) = 4" in both.stdout  # a_other reverted
    only_first = run_program(refs_prog, "5", patches=str(first))
    assert "other(5) = 500" in only_first.stdout


# ---- inlined copies -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inline_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inline")
    prog = build_program(copy_programs(d, "authoring_inline.c"), d / "inl", with_shim=False)
    names = function_names(prog)
    if not {"bump", "square", "add_two", "sum_squares"} <= names or "tiny" in names:
        pytest.skip(f"gcc did not inline as expected: {sorted(names)}")
    return prog


def replace_patch(tmp_path: Path, *olds: str, name: str = "p.c") -> Path:
    body = "#include <fentry.h>\n"
    for old in olds:
        body += f"static int {old}_new(int x) {{ return x; }}\nFENTRY_REPLACE({old}, {old}_new);\n"
    return write(tmp_path / name, body)


def test_inlined_static_function_warns_naming_the_caller(inline_prog: Path, tmp_path: Path) -> None:
    patch = replace_patch(tmp_path, "bump")
    _, warnings = generate(inline_prog, patch)
    assert len(warnings) == 1, warnings
    (w,) = warnings
    assert w.startswith(f"{patch}:3: patching bump does not reach all of its code")
    assert "inlined copies of it into add_two" in w
    assert "replace add_two too" in w and "noinline" in w
    assert "inline-only-static" not in w  # it would not stop inlining a static function
    assert "records no inlined copy" not in w  # DWARF records the copy


def test_inlined_global_function_suggests_the_flag(inline_prog: Path, tmp_path: Path) -> None:
    _, (w,) = generate(inline_prog, replace_patch(tmp_path, "square"))
    assert "inlined copies of it into main and sum_squares" in w or \
        "inlined copies of it into sum_squares" in w
    assert "-flive-patching=inline-only-static" in w


def test_replacing_the_callers_too_silences_the_warning(inline_prog: Path, tmp_path: Path) -> None:
    _, warnings = generate(inline_prog, replace_patch(tmp_path, "bump", "add_two"))
    assert warnings == []


def test_inlined_copy_is_an_error_when_strict(inline_prog: Path, tmp_path: Path) -> None:
    patch = replace_patch(tmp_path, "bump")
    message = generate_error(inline_prog, patch, strict=True)
    assert "inlined copies of it into add_two" in message and "--strict" in message
    out = tmp_path / "reg.c"
    proc = gen_cli(inline_prog, patch, out, "--strict")
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.startswith("fentry-gen: error: ") and proc.stderr.count("\n") == 1
    proc = gen_cli(inline_prog, patch, out, FENTRY_STRICT="1")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "add_two" in proc.stderr
    proc = gen_cli(inline_prog, patch, out, FENTRY_STRICT="0")
    assert proc.returncode == 0 and out.exists()
    assert proc.stderr.startswith("fentry-gen: warning: ") and proc.stderr.count("\n") == 1


def test_function_inlined_everywhere_names_its_callers(inline_prog: Path, tmp_path: Path) -> None:
    message = generate_error(inline_prog, replace_patch(tmp_path, "tiny"))
    assert "tiny has no body of its own in inl: GCC inlined every call of it, into use_tiny" in message


def dwarf_inlined_unrecorded(binary: Path, name: str) -> bool:
    """Does binary's DWARF say `name` was inlined (DW_AT_inline 1) with no inlined copy of it?"""
    with open(binary, "rb") as stream:
        dwarf = ELFFile(stream).get_dwarf_info()
        abstract, copies = set(), set()
        for cu in dwarf.iter_CUs():
            for d in cu.iter_DIEs():
                if d.tag == "DW_TAG_subprogram" and "DW_AT_name" in d.attributes \
                        and d.attributes["DW_AT_name"].value == name.encode() \
                        and d.attributes.get("DW_AT_inline") is not None \
                        and d.attributes["DW_AT_inline"].value == 1:
                    abstract.add(d.offset)
                elif d.tag == "DW_TAG_inlined_subroutine":
                    copies.add(d.get_DIE_from_attribute("DW_AT_abstract_origin").offset)
        return bool(abstract) and not abstract & copies


@pytest.fixture(scope="module")
def folded_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scale inlined into limit and folded there to a constant: DWARF records no copy.  Built
    as SCons builds (the object beside its source, so gcc writes authoring_folded.c's
    -fdump-ipa-clones file beside it too), with the instrumentation flags."""
    return build_folded(tmp_path_factory.mktemp("folded"))


def build_folded(d: Path) -> Path:
    (src,) = copy_programs(d, "authoring_folded.c")
    run(["gcc", "-O2", *INSTRUMENT, f"-I{paths.include_dir()}", "-c", src.name,
         "-o", "authoring_folded.o"], cwd=d)
    prog = d / "fold"
    run(["gcc", *PROGRAM_LINK_ARGS, "-o", str(prog), "authoring_folded.o"], cwd=d)
    if not {"scale", "limit"} <= function_names(prog) or not dwarf_inlined_unrecorded(prog, "scale"):
        pytest.skip("gcc did not leave scale inlined with no inlined copy recorded")
    return prog


def folded_dump(prog: Path) -> Path:
    return prog.parent / ("authoring_folded.c" + DUMP_SUFFIX)


def test_copy_dwarf_does_not_record_is_named_from_the_builds_ipa_clones(
        folded_prog: Path, tmp_path: Path) -> None:
    assert "Callgraph clone;scale;" in folded_dump(folded_prog).read_text()
    patch = replace_patch(tmp_path, "scale")
    _, warnings = generate(folded_prog, patch)
    assert len(warnings) == 1, warnings
    (w,) = warnings
    assert w.startswith(f"{patch}:3: patching scale may not reach all of its code: its DWARF says "
                        "GCC inlined it, yet records no inlined copy; the build's "
                        "-fdump-ipa-clones says it was inlined into limit, which may keep running "
                        "the old code")
    assert "fix: replace limit too in this patch" in w and "noinline" in w
    out = tmp_path / "reg.c"
    proc = gen_cli(folded_prog, patch, out, FENTRY_STRICT="1")
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.startswith("fentry-gen: error: ") and proc.stderr.count("\n") == 1
    assert "inlined into limit" in proc.stderr and "--strict" in proc.stderr


def test_replacing_the_callers_the_dump_names_too_silences_it(folded_prog: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\n"
                  "static int scale_new(int x) { return x; }\nFENTRY_REPLACE(scale, scale_new);\n"
                  "static int limit_new(void) { return 1; }\nFENTRY_REPLACE(limit, limit_new);\n")
    _, warnings = generate(folded_prog, patch)
    assert warnings == []


def test_without_a_dump_of_this_build_the_warning_names_no_caller(folded_prog: Path,
                                                                 tmp_path: Path) -> None:
    # The program with a dump written after it was linked (a later build's), then without
    # its dump: neither is believed; the warning stays, naming no caller.
    prog = build_folded(tmp_path / "b")
    dump = folded_dump(prog)
    patch = replace_patch(tmp_path, "scale")
    for case in ("newer", "missing"):
        if case == "newer":
            later = prog.stat().st_mtime + 60
            os.utime(dump, (later, later))
        else:
            dump.unlink()
        _, warnings = generate(prog, patch)
        assert len(warnings) == 1, (case, warnings)
        (w,) = warnings
        assert w.startswith(f"{patch}:3: patching scale may not reach all of its code: its DWARF "
                            "says GCC inlined it, yet records no inlined copy: a copy whose code "
                            "GCC folded into its caller"), case
        assert "limit" not in w and "replace each function that calls scale too" in w, case
        proc = gen_cli(prog, patch, tmp_path / "reg.c", FENTRY_STRICT="1")
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1
        assert "records no inlined copy" in proc.stderr, case


def test_no_dwarf_is_said_once(tmp_path: Path) -> None:
    prog = build_program(copy_programs(tmp_path, "authoring_inline.c"), tmp_path / "inl",
                         cflags=["-g0"], with_shim=False)
    patch = replace_patch(tmp_path, "bump", "add_two", "sum_squares")
    _, warnings = generate(prog, patch)
    assert warnings == [f"{patch}: cannot check for inlined copies or the patch's types: inl has no DWARF; build with -g"]
    assert "no DWARF" in generate_error(prog, patch, strict=True)
    proc = gen_cli(prog, patch, tmp_path / "r.c")
    assert proc.returncode == 0 and proc.stderr.count("\n") == 1


def test_function_inlined_everywhere_without_dwarf_names_inlining_as_the_cause(
        tmp_path: Path) -> None:
    prog = build_program(copy_programs(tmp_path, "authoring_inline.c"), tmp_path / "inl",
                         cflags=["-g0"], with_shim=False)
    assert "tiny" not in function_names(prog)
    message = generate_error(prog, replace_patch(tmp_path, "tiny"))
    assert "no function tiny in inl: no symbol has that name" in message
    assert "GCC inlined a static tiny into every caller" in message
    assert "build the program with -g" in message and "noinline" in message
    assert "fix the first argument of FENTRY_REPLACE(tiny, tiny_new)" in message


def test_function_in_a_file_without_dwarf_is_said(tmp_path: Path) -> None:
    main_c = write(tmp_path / "main.c", "int work(int);\nint main(int c, char **v) "
                   "{ (void)v; return work(c); }\n")
    work_c = write(tmp_path / "work.c", "int work(int x) { return x * 3; }\n")
    objs = []
    for src, g in ((main_c, "-g"), (work_c, "-g0")):
        obj = tmp_path / (src.stem + ".o")
        run(["gcc", "-O2", g, "-pg", "-mfentry", "-c", str(src), "-o", str(obj)])
        objs.append(str(obj))
    prog = tmp_path / "mixed"
    run(["gcc", "-o", str(prog), *objs])
    patch = replace_patch(tmp_path, "work")
    _, (w,) = generate(prog, patch)
    assert w.startswith(f"{patch}:3: cannot check work for inlined copies or its prototype")
    assert "compile" in w and "with -g" in w


# ---- IPA clones -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clones_prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clones")
    prog = build_program(copy_programs(d, "authoring_clones.c"), d / "clones", cflags=["-O3"],
                         with_shim=False)
    names = function_names(prog)
    if not {"scale", "scale.constprop.0", "lookup", "lookup.part.0"} <= names:
        pytest.skip(f"gcc did not make the clones: {sorted(names)}")
    return prog


def scale_patch(tmp_path: Path, extra: str = "") -> Path:
    return write(tmp_path / "p.c", "#include <fentry.h>\nstatic int s(int x, int k) { return x + k; }\n"
                 "FENTRY_REPLACE(scale, s);\n" + extra)


def test_constprop_clone_warns_with_its_callers(clones_prog: Path, tmp_path: Path) -> None:
    patch = scale_patch(tmp_path)
    _, warnings = generate(clones_prog, patch)
    assert len(warnings) == 1
    (w,) = warnings
    assert w.startswith(f"{patch}:3: patching scale does not reach all of its code")
    assert "IPA clone(s) scale.constprop.0 (called from main)" in w
    assert "-flive-patching=inline-only-static" in w and "replace main too" in w


def test_clone_is_an_error_when_strict(clones_prog: Path, tmp_path: Path) -> None:
    patch = scale_patch(tmp_path)
    assert "scale.constprop.0" in generate_error(clones_prog, patch, strict=True)
    proc = gen_cli(clones_prog, patch, tmp_path / "r.c", "--strict")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "scale.constprop.0" in proc.stderr and "--strict" in proc.stderr


def test_part_clone_and_inlined_head(clones_prog: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int l(int x) { return x; }\n"
                  "FENTRY_REPLACE(lookup, l);\n")
    _, (w,) = generate(clones_prog, patch)
    assert "lookup.part.0" in w and "main" in w


def test_replacing_the_clones_callers_silences_it(clones_prog: Path, tmp_path: Path) -> None:
    patch = scale_patch(tmp_path, "static int m(int c, char **v) { (void)v; return c; }\n"
                        "FENTRY_REPLACE(main, m);\n")
    _, warnings = generate(clones_prog, patch, strict=True)
    assert warnings == []


# ---- new-patch ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """authoring_protos.[ch] and the program built from them with the shim, in one folder that
    the tests also use as the project (so the skeleton includes "../authoring_protos.h")."""
    d = tmp_path_factory.mktemp("protos")
    copy_programs(d, "authoring_protos.c", "authoring_protos.h")
    return build_program([d / "authoring_protos.c"], d / "protos")


def fresh_project(tmp_path: Path, meson: str | None = None) -> Path:
    """Another project folder, for tests of its meson.build (includes then reach the program's
    folder by a longer relative path)."""
    project = tmp_path / "proj"
    project.mkdir()
    if meson is not None:
        write(project / "meson.build", meson)
    return project


def signature(patch: Path) -> str:
    return next(line for line in patch.read_text().splitlines() if line.startswith("static "))


@pytest.mark.parametrize(("function", "expected"), [
    ("plain", "static int plain_fixed(int a, long b, unsigned char c)"),
    ("qualified", "static const char *const *qualified_fixed(const char *s, char *const p, "
                  "volatile int *v, const volatile unsigned int *cv)"),
    ("arrays", "static size_t arrays_fixed(int *rows, int (*grid)[3], const char **lines)"),
    ("callbacks", "static int callbacks_fixed(int (*cmp)(const void *, const void *), "
                  "void (*done)(void), visit_fn visit)"),
    ("by_value", "static struct point by_value_fixed(struct point p, union number n, "
                 "enum shade s, count_t c)"),
    ("with_types", "static int with_types_fixed(struct request *req, uint32_t flags, FILE *out)"),
    ("logf_", "static int logf__fixed(int level, const char *fmt, ...)"),
    ("vlogf_", "static int vlogf__fixed(const char *fmt, va_list ap)"),
    ("nothing", "static void nothing_fixed(void)"),
    ("pick", "static int (*pick_fixed(int which))(int)"),
    ("secret", "static int secret_fixed(int x)"),
])
def test_new_patch_writes_the_exact_prototype(protos: Path, tmp_path: Path, function: str,
                                               expected: str) -> None:
    project = protos.parent
    result = newpatch.new_patch(f"fix_{function}", function, protos, project)
    patch = project / "patches" / f"fix_{function}.c"
    assert result.path == patch and signature(patch) == expected
    text = patch.read_text()
    assert text.startswith("/*") and "#include <fentry.h>" in text
    assert f"FENTRY_DECLARE_ORIGINAL({function});" in text
    replace = f'FENTRY_REPLACE({function}, {function}_fixed, "authoring_protos.c");' \
        if function == "secret" else f"FENTRY_REPLACE({function}, {function}_fixed);"
    assert replace in text
    # The skeleton compiles cleanly, and links with its registration into a patch.
    so = build_patch(protos, patch, tmp_path / f"fix_{function}.so", cflags=WERROR)
    assert descriptor_words(so)["nfuncs"] == 1


def test_new_patch_includes_and_repeats_the_types(protos: Path) -> None:
    project = protos.parent
    newpatch.new_patch("a", "with_types", protos, project)
    text = (project / "patches" / "a.c").read_text()
    assert "#include <stdint.h> /* uint32_t */" in text and "#include <stdio.h> /* FILE */" in text
    assert '#include "../authoring_protos.h" /* struct request */' in text
    newpatch.new_patch("b", "by_value", protos, project)
    text = (project / "patches" / "b.c").read_text()
    assert "struct point {\n\tint x;\n\tint y;\n};" in text
    assert "enum shade { DARK = 0, LIGHT = 4 };" in text and "typedef unsigned long count_t;" in text
    newpatch.new_patch("c", "pick", protos, project)
    text = (project / "patches" / "c.c").read_text()
    assert "int (*(*orig)(int))(int) = FENTRY_ORIGINAL(pick, int (*(*)(int))(int));" in text
    assert "\treturn orig(which);" in text


def test_new_patch_skeleton_keeps_the_behaviour_until_edited(protos: Path, tmp_path: Path) -> None:
    project = fresh_project(tmp_path)
    plain = run_program(protos, "6")
    assert plain.returncode == 0 and "secret 43" in plain.stdout
    newpatch.new_patch("fix_secret", "secret", protos, project)
    patch = project / "patches" / "fix_secret.c"
    so = build_patch(protos, patch, tmp_path / "fix_secret.so", cflags=WERROR)
    same = run_program(protos, "6", patches=str(so))
    assert (same.returncode, same.stderr) == (0, "")
    assert same.stdout == plain.stdout  # the skeleton runs the original
    # ... and it is really in effect: an edit shows.
    write(patch, patch.read_text().replace("return orig(x);", "return orig(x) + 1000;"))
    so = build_patch(protos, patch, tmp_path / "fix_secret2.so", cflags=WERROR)
    edited = run_program(protos, "6", patches=str(so))
    assert "secret 1043" in edited.stdout


def test_new_patch_adds_to_the_snippet_dict(protos: Path, tmp_path: Path) -> None:
    snippet = meson_init.meson_snippet("protos", ["authoring_protos.c"], {"fix": "patches/fix.c"})
    project = fresh_project(tmp_path, snippet)
    result = newpatch.new_patch("fix_plain", "plain", protos, project)
    assert result.registration.updated
    text = (project / "meson.build").read_text()
    assert "  'fix': 'patches/fix.c',\n  'fix_plain': 'patches/fix_plain.c',\n}" in text
    assert text.replace("  'fix_plain': 'patches/fix_plain.c',\n", "") == snippet
    assert "added 'fix_plain': 'patches/fix_plain.c'" in newpatch.format_result(result)


def test_new_patch_adds_to_a_one_line_dict(protos: Path, tmp_path: Path) -> None:
    hello = (paths.examples_dir() / "hello" / "meson.build").read_text()
    project = fresh_project(tmp_path, hello)
    newpatch.new_patch("fix-2", "plain", protos, project)
    assert "patches = {'my_patch': 'patches/my_patch.c', 'fix-2': 'patches/fix-2.c'}" in \
        (project / "meson.build").read_text()


def test_new_patch_prints_the_line_when_it_finds_no_dict(protos: Path, tmp_path: Path) -> None:
    odd = "project('x', 'c')\npatches = get_option('patches')\n"
    project = fresh_project(tmp_path, odd)
    result = newpatch.new_patch("fix", "plain", protos, project)
    assert not result.registration.updated and (project / "meson.build").read_text() == odd
    assert "  'fix': 'patches/fix.c'," in newpatch.format_result(result)


def test_new_patch_in_an_scons_project_adds_to_the_sconstruct_and_says_scons(
        protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "sconsproj"
    project.mkdir()
    sconstruct = project / "SConstruct"
    sconstruct.write_text((paths.examples_dir() / "hello" / "SConstruct").read_text())
    binary = project / "protos"
    shutil.copy(protos, binary)  # SCons builds the program in the project's folder
    monkeypatch.chdir(project)
    result = newpatch.new_patch("fix_plain", "plain", binary, project)
    assert result.registration.system == "scons" and result.registration.updated
    assert "'fix_plain': 'patches/fix_plain.c'}" in sconstruct.read_text()
    out = newpatch.format_result(result)
    assert "scons patches" in out and "fentry-build apply --pid PID fix_plain.so" in out
    assert "meson" not in out


def test_new_patch_in_a_meson_build_folder_names_that_folder(
        protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = fresh_project(tmp_path, meson_init.meson_snippet("p", ["p.c"], {}))
    (project / "SConstruct").write_text("# both build files: the binary's folder decides\n")
    build = project / "out-rel"
    (build / "meson-info").mkdir(parents=True)
    shutil.copy(protos, build / "protos")
    monkeypatch.chdir(project)
    result = newpatch.new_patch("fix_plain", "plain", build / "protos", project)
    assert result.registration.system == "meson"
    out = newpatch.format_result(result)
    assert "  meson compile -C out-rel patches" in out
    assert "  fentry-build apply --pid PID out-rel/fix_plain.so" in out


def test_new_patch_refuses_to_overwrite_and_checks_names(protos: Path, tmp_path: Path) -> None:
    project = fresh_project(tmp_path, meson_init.meson_snippet("p", ["p.c"], {"fix": "patches/fix.c"}))
    write_first = newpatch.new_patch("one", "plain", protos, project)
    before = write_first.path.read_text()
    cases = [
        (("one", "plain"), "already exists; new-patch never overwrites"),
        (("fix", "plain"), "already has a patch named 'fix'"),
        (("bad name", "plain"), "is not a usable patch name"),
        (("two", "plian"), "no function plian in protos; did you mean plain?"),
    ]
    for (name, function), expected in cases:
        with pytest.raises(FentryError) as e:
            newpatch.new_patch(name, function, protos, project)
        assert expected in str(e.value) and "\n" not in str(e.value)
    assert write_first.path.read_text() == before
    assert not (project / "patches" / "two.c").exists()


def test_new_patch_needs_dwarf_and_a_site(tmp_path: Path) -> None:
    src = copy_programs(tmp_path, "authoring_protos.c", "authoring_protos.h")[0]
    prog = build_program([src], tmp_path / "nodwarf", cflags=["-g0"], with_shim=False)
    project = tmp_path / "proj"
    project.mkdir()
    with pytest.raises(FentryError) as e:
        newpatch.new_patch("fix", "plain", prog, project)
    assert "has none: build it with -g" in str(e.value)
    plain = tmp_path / "plainprog"
    run(["gcc", "-O2", "-g", "-o", str(plain), str(src)])
    with pytest.raises(FentryError) as e:
        newpatch.new_patch("fix", "plain", plain, project)
    assert "not instrumented" in str(e.value)
    assert not (project / "patches").exists()


def test_new_patch_ambiguous_static_needs_file(tmp_path: Path) -> None:
    twin = "static __attribute__((noinline, noclone)) int helper(int x) {{ return x + {k}; }}\n" \
           "int call_{n}(int x) {{ return helper(x); }}\n"
    a = write(tmp_path / "a.c", twin.format(k=1, n="a"))
    b = write(tmp_path / "b.c", twin.format(k=2, n="b"))
    m = write(tmp_path / "m.c", "int call_a(int), call_b(int);\n"
              "int main(int c, char **v) { (void)v; return call_a(c) + call_b(c); }\n")
    prog = build_program([a, b, m], tmp_path / "twins", with_shim=False)
    project = tmp_path / "proj"
    project.mkdir()
    with pytest.raises(FentryError) as e:
        newpatch.new_patch("fix", "helper", prog, project)
    assert "helper is ambiguous" in str(e.value) and "--file a.c" in str(e.value)
    result = newpatch.new_patch("fix", "helper", prog, project, file="b.c")
    assert 'FENTRY_REPLACE(helper, helper_fixed, "b.c");' in result.path.read_text()
    gen.generate(prog, result.path, lambda m: None)


def test_new_patch_notes_inlined_copies(inline_prog: Path, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    result = newpatch.new_patch("fix", "bump", inline_prog, project)
    assert any("add_two" in n for n in result.notes)
    assert "note: patching bump does not reach" in newpatch.format_result(result)


def test_new_patch_cli(protos: Path, tmp_path: Path) -> None:
    project = fresh_project(tmp_path, meson_init.meson_snippet("p", ["p.c"], {}))
    proc = python("-m", "fentry_build", "new-patch", "fix_nothing", "--function", "nothing",
                  "--binary", str(protos), "--project", str(project), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "wrote " in proc.stdout and "fix_nothing.c" in proc.stdout
    assert "'fix_nothing': 'patches/fix_nothing.c'," in (project / "meson.build").read_text()
    proc = python("-m", "fentry_build", "new-patch", "fix_nothing", "--function", "nothing",
                  "--binary", str(protos), "--project", str(project), timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("fentry-build: error: ") and proc.stderr.count("\n") == 1


# ---- the prototype check: the compiler compares the patch's types with the program's ------------

PROTOS_PATCH_HEAD = '#include <stdio.h>\n#include <stdint.h>\n#include <fentry.h>\n#include "authoring_protos.h"\n'


def protos_patch(protos: Path, tmp_path: Path, body: str) -> Path:
    return write(tmp_path / "p.c", PROTOS_PATCH_HEAD + body)


def protos_generate(protos: Path, patch: Path, **kw: object) -> tuple[str, list[str]]:
    compile = PatchCompile.find(patch, explicit=["gcc", f"-I{protos.parent}"])
    return generate(protos, patch, compile=compile, **kw)


def protos_error(protos: Path, patch: Path) -> str:
    compile = PatchCompile.find(patch, explicit=["gcc", f"-I{protos.parent}"])
    return generate_error(protos, patch, compile=compile)


def test_a_replacement_with_another_prototype_does_not_build(protos: Path, tmp_path: Path) -> None:
    patch = protos_patch(protos, tmp_path, "static int p2(int a, int b, unsigned char c) "
                         "{ return a + b + c; }\nFENTRY_REPLACE(plain, p2);\n")
    message = protos_error(protos, patch)
    assert message.startswith(f"{patch}:6: the replacement int p2(int, int, unsigned char) does "
                              "not have the prototype of int plain(int, long, unsigned char) in protos")
    assert "give p2 the prototype of plain" in message
    assert "FENTRY_REPLACE_UNCHECKED(plain, p2) if the difference is deliberate" in message
    out = tmp_path / "reg.c"
    proc = python("-m", "fentry_build.gen", "--binary", str(protos), "--patch", str(patch), "-o",
                  str(out), "--", "gcc", f"-I{protos.parent}", timeout=TIMEOUT)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("body", [
    "static int p2(int a, long b) { return a + (int)b; }\n",          # a parameter too few
    "static long p2(int a, long b, unsigned char c) { return a + b + c; }\n",  # the return type
    "static int p2(int a, long *b, unsigned char c) { return a + (int)*b + c; }\n",
])
def test_every_kind_of_prototype_difference_is_caught(protos: Path, tmp_path: Path, body: str) -> None:
    patch = protos_patch(protos, tmp_path, body + "FENTRY_REPLACE(plain, p2);\n")
    assert "does not have the prototype of int plain(int, long, unsigned char)" in \
        protos_error(protos, patch)


def test_unchecked_replacement_is_the_documented_opt_out(protos: Path, tmp_path: Path) -> None:
    patch = protos_patch(protos, tmp_path, "static int p2(int a, int b, unsigned char c) "
                         "{ return a + b + c; }\nFENTRY_REPLACE_UNCHECKED(plain, p2);\n")
    reg, warnings = protos_generate(protos, patch)
    assert warnings == [] and '.name = "plain"' in reg
    assert "FENTRY_REPLACE_UNCHECKED(plain, p2): p.c line 6" in reg


def test_other_spellings_of_the_same_types_pass(protos: Path, tmp_path: Path) -> None:
    # Typedefs resolved (count_t, uint32_t, size_t, visit_fn), arrays decayed, tags by name,
    # parameter names and top-level qualifiers of parameters are the patch's own business.
    patch = protos_patch(protos, tmp_path, """
struct point { int x, y; };
union number { long i; double d; };
enum shade { DARK, LIGHT = 4 };
static unsigned long a2(int *rows, int (*g)[3], const char **lines) { return (unsigned long)rows[0] + (unsigned long)g[0][0] + (lines != 0); }
static struct point b2(struct point p, union number n, enum shade s, unsigned long c) { (void)n; (void)s; (void)c; return p; }
static int c2(struct request *const req, unsigned int flags, FILE *out) { return req->id + (int)flags + (out != 0); }
static int d2(int (*cmp)(const void *, const void *), void (*done)(void), int (*v)(struct request *, void *)) { return (cmp != 0) + (done != 0) + (v != 0); }
FENTRY_DECLARE_ORIGINAL(arrays);
static int e2(const int x) { return x + (FENTRY_ORIGINAL(arrays, unsigned long (*)(int *, int (*)[3], const char **)) != 0); }
FENTRY_REPLACE(arrays, a2);
FENTRY_REPLACE(by_value, b2);
FENTRY_REPLACE(with_types, c2);
FENTRY_REPLACE(callbacks, d2);
FENTRY_REPLACE(secret, e2, "authoring_protos.c");
""")
    reg, warnings = protos_generate(protos, patch)
    assert warnings == [] and reg.count(".replacement = ") == 5


def test_a_wrong_original_type_does_not_build(protos: Path, tmp_path: Path) -> None:
    patch = protos_patch(protos, tmp_path, "FENTRY_DECLARE_ORIGINAL(plain);\n"
                         "static int p2(int a, long b, unsigned char c)\n{\n"
                         "\treturn FENTRY_ORIGINAL(plain, int (*)(int, int, unsigned char))(a, (int)b, c);\n}\n"
                         "FENTRY_REPLACE(plain, p2);\n")
    message = protos_error(protos, patch)
    assert message.startswith(f"{patch}:8: FENTRY_ORIGINAL(plain, int (*)(int, int, unsigned char)): "
                              "plain in protos is int (*)(int, long, unsigned char); give "
                              "FENTRY_ORIGINAL that type")


def test_a_wrong_ref_type_does_not_build(refs_prog: Path, tmp_path: Path) -> None:
    patch = ref_patch(tmp_path, "FENTRY_REF(served, int);\nFENTRY_REF(log_line, void (const char *));\n")
    message = generate_error(refs_prog, patch)
    assert message.startswith(f"{patch}:3: FENTRY_REF(served, int): served in refs is long; give "
                              "FENTRY_REF that type")
    fine = ref_patch(tmp_path, "FENTRY_REF(served, long);\nFENTRY_REF(log_line, void (const char *));\n")
    assert generate(refs_prog, fine)[1] == []
    wrong_fn = ref_patch(tmp_path, "FENTRY_REF(log_line, void (char *, int));\n")
    assert "log_line in refs is void (const char *)" in generate_error(refs_prog, wrong_fn)


def test_a_type_the_patch_cannot_name_is_a_warning_and_strict_fails(tmp_path: Path) -> None:
    # A function of an anonymous struct's typedef: the check needs its name, which the patch
    # does not declare; the generator says it could not check, and builds.
    src = write(tmp_path / "anon.c", "typedef struct { int v; } box_t;\n"
                "__attribute__((noinline, noclone)) int unbox(box_t *b) { return b->v; }\n"
                "int main(void) { box_t b = { 3 }; return unbox(&b) - 3; }\n")
    prog = build_program([src], tmp_path / "anon", with_shim=False)
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstruct other { int v; };\n"
                  "static int u2(struct other *b) { return b->v; }\nFENTRY_REPLACE(unbox, u2);\n")
    _, warnings = generate(prog, patch)
    assert len(warnings) == 1 and warnings[0].startswith(
        f"{patch}:4: cannot check the type of the replacement u2 of unbox against the program's")
    assert "--strict" in generate_error(prog, patch, strict=True)
