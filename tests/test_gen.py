"""Tests of the generator, the ELF reader, the patch-source parser and `check`, on real gcc builds."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from fentry_build import jinja, paths
from fentry_build.binary import check
from fentry_build.binary.elf import FunctionInfo, SiteForm, read_binary
from fentry_build.errors import FentryError
from fentry_build.generator import main as gen

from support.builds import INSTRUMENT, assert_placed, build_patch, build_program, run
from support.patches import scan_text
from support.cli import python

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

PROGRAM_C = r"""
#include <stdio.h>
#include <stdlib.h>

static __attribute__((noinline, noclone)) int helper(int x) { return x * 3 + 1; }
static __attribute__((noinline, noclone)) int taken(int x) { return x - 2; }
int (*volatile taken_ptr)(int) = taken;

__attribute__((noinline)) int compute(int x) { return helper(x) + taken_ptr(x); }

int main(int argc, char **argv)
{
	printf("%d\n", compute(atoi(argv[argc - 1])));
	return 0;
}
"""

# A __fentry__ of the program's own: the linker relaxes the GOT call to `67 e8`.
FENTRY_S = """
	.text
	.globl __fentry__
	.type __fentry__, @function
__fentry__:
	ret
	.size __fentry__, .-__fentry__
	.section .note.GNU-stack,"",@progbits
"""

# Functions that start with a call, but not of __fentry__: none of them is a site.
DECOYS_S = """
	.text
	.globl other_fn, decoy_e8, decoy_addr32, decoy_got
	.type other_fn, @function
other_fn:
	ret
	.size other_fn, .-other_fn
	.type decoy_e8, @function
decoy_e8:
	call other_fn
	ret
	.size decoy_e8, .-decoy_e8
	.type decoy_addr32, @function
decoy_addr32:
	.byte 0x67
	call other_fn
	ret
	.size decoy_addr32, .-decoy_addr32
	.type decoy_got, @function
decoy_got:
	call *puts@GOTPCREL(%rip)
	ret
	.size decoy_got, .-decoy_got
	.section .note.GNU-stack,"",@progbits
"""

PATCH_C = r"""
#include <fentry.h>

FENTRY_DECLARE_ORIGINAL(compute);

static int compute_fixed(int x)
{
	int (*orig)(int) = FENTRY_ORIGINAL(compute, int (*)(int));
	return orig(x) + 100;
}
FENTRY_REPLACE(compute, compute_fixed);

static int helper_fixed(int x) { return x * 4; }
FENTRY_REPLACE(helper, helper_fixed, "prog.c");
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def build(out: Path, sources: dict[str, str], *, cflags: tuple[str, ...] = (),
          ldflags: tuple[str, ...] = (), plain: tuple[str, ...] = ()) -> Path:
    """Compile `sources` (name -> text) into `out`: C with -pg -mfentry unless in `plain`, .S as is."""
    objs = []
    for name, text in sources.items():
        src = write(out.parent / name, text)
        obj = out.parent / f"{out.name}.{name}.o"
        flags = [] if name.endswith(".S") or name in plain else INSTRUMENT
        run(["gcc", "-O2", *flags, *cflags, f"-I{paths.include_dir()}", "-c", str(src), "-o", str(obj)])
        objs.append(str(obj))
    run(["gcc", *cflags, *ldflags, "-o", str(out), *objs])
    return out


def function(binary: Path, name: str, file: str | None = None) -> FunctionInfo:
    found = [f for f in read_binary(binary).functions
             if f.name == name and (file is None or f.file == file)]
    assert len(found) == 1, found
    return found[0]


def objdump_entry(binary: Path, name: str, count: int) -> list[tuple[bytes, str]]:
    """The first `count` instructions of `name` as objdump prints them: (bytes, text)."""
    text = run(["objdump", "-d", f"--disassemble={name}", str(binary)]).stdout
    insns = []
    for line in text.splitlines():
        m = re.match(r"\s*[0-9a-f]+:\t([0-9a-f ]+?)\s*\t(.*)", line)
        if m:
            insns.append((bytes.fromhex(m.group(1).replace(" ", "")), m.group(2)))
    return insns[:count]


def assert_site(binary: Path, name: str, form: SiteForm, offset: int,
                file: str | None = None) -> FunctionInfo:
    f = function(binary, name, file)
    assert f.site is not None, f"{name} has no site"
    assert (f.site.form, f.site.offset, f.site.length) == (form, offset, form.length)
    insns = objdump_entry(binary, name, 2 if offset else 1)
    assert b"".join(i[0] for i in insns) == f.site.entry
    assert "__fentry__" in insns[-1][1]
    return f


def generate_errors(binary: Path, patch: Path) -> str:
    with pytest.raises(FentryError) as e:
        gen.generate(binary, patch)
    message = str(e.value)
    assert "\n" not in message
    return message


# ---- call-site forms --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pie_glibc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PIE, no shim: __fentry__ binds to glibc through the GOT."""
    d = tmp_path_factory.mktemp("pie")
    return build_program([write(d / "prog.c", PROGRAM_C)], d / "prog", with_shim=False)


def test_pie_with_glibc_fentry_calls_through_the_got(pie_glibc: Path) -> None:
    for name in ("compute", "main", "helper", "taken"):
        assert_site(pie_glibc, name, SiteForm.CALL_GOT, 0)
    assert function(pie_glibc, "helper").file == "prog.c"
    assert function(pie_glibc, "helper").local


def test_fentry_in_the_program_is_relaxed_to_addr32_call(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {"prog.c": PROGRAM_C, "fentry.S": FENTRY_S})
    for name in ("compute", "helper"):
        assert_site(prog, name, SiteForm.ADDR32_CALL, 0)
    assert function(prog, "__fentry__").site is None


@pytest.mark.parametrize("own_fentry", [False, True])
def test_no_pie_calls_rel32(tmp_path: Path, own_fentry: bool) -> None:
    sources = {"prog.c": PROGRAM_C} | ({"fentry.S": FENTRY_S} if own_fentry else {})
    prog = build(tmp_path / "prog", sources, cflags=("-fno-pie",), ldflags=("-no-pie",))
    assert_site(prog, "compute", SiteForm.CALL_REL32, 0)
    callee = objdump_entry(prog, "compute", 1)[0][1]
    assert ("@plt" in callee) is not own_fentry


def test_cf_protection_puts_endbr64_first_except_on_unaddressed_statics(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {"prog.c": PROGRAM_C}, cflags=("-fcf-protection",))
    assert_site(prog, "compute", SiteForm.CALL_GOT, 4)
    assert_site(prog, "taken", SiteForm.CALL_GOT, 4)  # its address is taken
    assert_site(prog, "helper", SiteForm.CALL_GOT, 0)  # static, never addressed: no endbr64


def test_ibt_plt_entry_in_plt_sec_is_followed_to_fentry(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {"prog.c": PROGRAM_C},
                 cflags=("-fno-pie", "-fcf-protection"), ldflags=("-no-pie", "-Wl,-z,ibtplt"))
    assert "__fentry__@plt" in objdump_entry(prog, "compute", 2)[1][1]
    assert_site(prog, "compute", SiteForm.CALL_REL32, 4)


@pytest.mark.parametrize("pie", [True, False])
def test_calls_of_other_functions_are_not_sites(tmp_path: Path, pie: bool) -> None:
    flags = {} if pie else {"cflags": ("-fno-pie",), "ldflags": ("-no-pie",)}
    prog = build(tmp_path / "prog", {"prog.c": PROGRAM_C, "decoys.S": DECOYS_S}, **flags)
    assert objdump_entry(prog, "decoy_addr32", 1)[0][0][:2] == b"\x67\xe8"
    for name in ("decoy_e8", "decoy_addr32", "decoy_got"):
        assert function(prog, name).site is None, name


def test_shared_library_sites(tmp_path: Path) -> None:
    src = write(tmp_path / "lib.c", "int lib_fn(int x) { return x + 1; }\n")
    lib = tmp_path / "libx.so"
    run(["gcc", "-O2", "-fPIC", "-shared", *INSTRUMENT, "-o", str(lib), str(src)])
    assert_site(lib, "lib_fn", SiteForm.CALL_GOT, 0)
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int f(int x) { return x; }\n"
                  "FENTRY_REPLACE(lib_fn, f);\n")
    assert '.target = "libx.so"' in gen.generate(lib, patch)


# ---- the registration source --------------------------------------------------------------


def read_descriptor(so: Path) -> tuple[int, int, bytes]:
    """abi_version, nfuncs and the build-id of the fentry_patch a patch .so exports."""
    with open(so, "rb") as stream:
        elf = ELFFile(stream)
        dynsym = elf.get_section_by_name(".dynsym")
        assert isinstance(dynsym, SymbolTableSection)
        (sym,) = dynsym.get_symbol_by_name("fentry_patch") or []
        assert sym["st_info"]["bind"] == "STB_GLOBAL" and sym["st_info"]["type"] == "STT_OBJECT"
        sec = elf.get_section(sym["st_shndx"])
        data = sec.data()[sym["st_value"] - sec["sh_addr"]:][: sym["st_size"]]
    abi, nfuncs = struct.unpack_from("<II", data, 0)
    (id_len,) = struct.unpack_from("<I", data, 16)
    return abi, nfuncs, data[20 : 20 + id_len]


def test_registration_compiles_with_the_patch_into_a_so(pie_glibc: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "fix.c", PATCH_C)
    so = tmp_path / "fix.so"
    reg = gen.generate(pie_glibc, patch)
    write(tmp_path / "reg.c", reg)
    run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", f"-I{paths.include_dir()}",
         "-o", str(so), str(patch), str(tmp_path / "reg.c")])
    build_id = read_binary(pie_glibc).build_id
    assert build_id is not None
    assert read_descriptor(so) == (1, 2, build_id)
    assert build_id.hex() in reg and "prog" in reg.splitlines()[4]
    helper = function(pie_glibc, "helper")
    assert f".addr = 0x{helper.addr:x}," in reg
    assert '.file = "prog.c"' in reg and ".file = NULL" in reg
    assert ".site_form = FENTRY_SITE_CALL_GOT" in reg


def test_build_patch_helper_runs_the_generator_module(pie_glibc: Path, tmp_path: Path) -> None:
    so = build_patch(pie_glibc, write(tmp_path / "fix.c", PATCH_C), tmp_path / "fix.so",
                     cflags=["-Wall", "-Wextra", "-Werror"])
    assert read_descriptor(so)[1] == 2


def test_main_writes_the_output_and_leaves_no_temporary(pie_glibc: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "fix.c", PATCH_C)
    out = tmp_path / "out" / "reg.c"
    out.parent.mkdir()
    assert gen.main(["--binary", str(pie_glibc), "--patch", str(patch), "-o", str(out)]) == 0
    first = out.stat().st_mtime_ns
    os.utime(out, ns=(first - 10**9, first - 10**9))
    assert gen.main(["--binary", str(pie_glibc), "--patch", str(patch), "-o", str(out)]) == 0
    assert out.stat().st_mtime_ns > first - 10**9  # rewritten even though unchanged
    assert [p.name for p in out.parent.iterdir()] == ["reg.c"]


def test_the_placement_header_starts_each_replacement_where_its_site_jumps(
        tmp_path: Path) -> None:
    # Its first use: the patch's compile line already -include's the header (as the Meson
    # snippet's does), which does not exist yet; the generator writes a placeholder first.
    prog = build_program([write(tmp_path / "prog.c", PROGRAM_C)], tmp_path / "prog")
    patch = write(tmp_path / "fix.c", PATCH_C)
    reg, place, dep = tmp_path / "fix_reg.c", tmp_path / "fix_place.h", tmp_path / "fix.d"
    line = ["gcc", "-include", str(place)]
    assert gen.main(["--binary", str(prog), "--patch", str(patch), "-o", str(reg), "--place",
                     str(place), "--depfile", str(dep), "--", *line]) == 0
    text = place.read_text()
    want = {new: function(prog, old).site.jump_residue(function(prog, old).addr)  # type: ignore[union-attr]
            for old, new in (("compute", "compute_fixed"), ("helper", "helper_fixed"))}
    assert "#define FENTRY_PLACE 1\n" in text
    assert dict(re.findall(r"#define FENTRY_PLACE__(\w+) (\d+)", text)) == \
        {k: str(v) for k, v in want.items()}
    assert str(place) not in dep.read_text()  # its own output: no input of the rule
    so = tmp_path / "fix.so"
    run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{paths.include_dir()}",
         *line[1:], "-o", str(so), str(patch), str(reg)])
    assert_placed(prog, so, {"compute": "compute_fixed", "helper": "helper_fixed"})
    # Without the header, FENTRY_REPLACE is what it always was: nothing placed.
    run(["gcc", "-O2", "-shared", "-fPIC", f"-I{paths.include_dir()}", "-o", str(so), str(patch),
         str(reg)])
    with open(so, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        assert {symtab.get_symbol_by_name(n)[0]["st_value"] % 16 for n in want} == {0}


def test_one_generator_run_opens_the_binary_once_and_checks_its_build_id_once(
        pie_glibc: Path, tmp_path: Path) -> None:
    from unittest import mock

    from fentry_build.binary import program as program_module

    patch = write(tmp_path / "fix.c", PATCH_C)
    opened: list[Path] = []
    real_open = program_module.Program.open

    def counting_open(path: Path) -> program_module.Program:
        opened.append(Path(path))
        return real_open(path)

    with mock.patch.object(program_module.Program, "open", counting_open), \
            mock.patch("builtins.open", wraps=open) as any_open, \
            mock.patch.object(gen, "check_build_id", wraps=gen.check_build_id) as checked:
        gen.generate(pie_glibc, patch)
    assert opened == [pie_glibc] and checked.call_count == 1
    assert [c.args[0] for c in any_open.call_args_list].count(pie_glibc) == 1


def test_c_strings_are_escaped() -> None:
    assert jinja.c_string(None) == "NULL"
    assert jinja.c_string('a"b\\c\n??/é') == '"a\\"b\\\\c\\012\\077\\077/\\303\\251"'
    assert jinja.c_comment("x*/y/*z") == "x*\\/y/\\*z"


# ---- static functions of the same name ------------------------------------------------------

TWIN_C = """
static __attribute__((noinline, noclone)) int helper(int x) {{ return x + {k}; }}
int call_{name}(int x) {{ return helper(x); }}
"""
TWIN_MAIN_C = """
int call_a(int), call_b(int);
int main(int argc, char **argv) { (void)argv; return call_a(argc) + call_b(argc); }
"""


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("twins")
    return build(d / "twins", {"a.c": TWIN_C.format(k=1, name="a"),
                               "b.c": TWIN_C.format(k=2, name="b"), "main.c": TWIN_MAIN_C})


def test_ambiguous_static_name_lists_files_and_asks_for_the_third_argument(
        twins: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int h(int x) { return x; }\n"
                  "FENTRY_REPLACE(helper, h);\n")
    message = generate_errors(twins, patch)
    assert message.startswith(f"{patch}:3: helper is ambiguous")
    assert "a.c" in message and "b.c" in message
    assert 'FENTRY_REPLACE(helper, h, "a.c")' in message


def test_file_qualifier_picks_the_static_function(twins: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", '#include <fentry.h>\nstatic int h(int x) { return x; }\n'
                  'FENTRY_REPLACE(helper, h, "src/b.c");\n')
    reg = gen.generate(twins, patch)
    b = function(twins, "helper", "b.c")
    assert f".addr = 0x{b.addr:x}," in reg and '.file = "b.c"' in reg


def test_same_name_replaced_in_two_files_gets_two_originals(twins: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\n"
                  "static int ha(int x) { return x; }\nstatic int hb(int x) { return x; }\n"
                  'FENTRY_REPLACE(helper, ha, "a.c");\nFENTRY_REPLACE(helper, hb, "b.c");\n')
    reg = write(tmp_path / "reg.c", gen.generate(twins, patch))
    text = reg.read_text()
    assert "void *fentry_orig__helper;" in text and "void *fentry_orig__helper__2;" in text
    run(["gcc", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", f"-I{paths.include_dir()}",
         "-o", str(tmp_path / "p.so"), str(patch), str(reg)])


def test_file_qualifier_that_matches_nothing(twins: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", '#include <fentry.h>\nstatic int h(int x) { return x; }\n'
                  'FENTRY_REPLACE(helper, h, "c.c");\n')
    message = generate_errors(twins, patch)
    assert 'no function helper of file "c.c"' in message
    assert "static in a.c" in message and "third argument" in message


def test_a_function_replaced_twice_is_refused_naming_the_first_line(twins: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int ha(int x) { return x; }\n"
                  "static int hb(int x) { return x; }\nstatic int hc(int x) { return x; }\n"
                  'FENTRY_REPLACE(helper, ha, "a.c");\nFENTRY_REPLACE(call_b, hb);\n'
                  'FENTRY_REPLACE(helper, hc, "src/a.c");\n')
    message = generate_errors(twins, patch)
    assert message.startswith(f"{patch}:7: ")
    assert "replaces the same function as line 5; replace each function once" in message


# ---- errors that name the function and the fix ----------------------------------------------


def test_missing_function_suggests_close_names(pie_glibc: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int h(int x) { return x; }\n\n"
                  "FENTRY_REPLACE(compte, h);\n")
    message = generate_errors(pie_glibc, patch)
    assert message.startswith(f"{patch}:4: no function compte in prog")
    assert "did you mean compute?" in message


def test_function_compiled_without_pg_is_not_instrumented(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {
        "prog.c": PROGRAM_C,
        "plain.c": "__attribute__((noinline)) int plain_fn(int x) { return x * 7; }\n",
    }, plain=("plain.c",))
    assert function(prog, "plain_fn").site is None
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int h(int x) { return x; }\n"
                  "FENTRY_REPLACE(plain_fn, h);\n")
    message = generate_errors(prog, patch)
    assert "plain_fn in prog is not instrumented" in message
    assert "-pg -mfentry" in message and "dependency('fentry')" in message


CLONE_ONLY_C = r"""
#include <stdio.h>
#include <stdlib.h>
static __attribute__((noinline)) int scale(int x, int k) { return x * k + (x >> 3); }
int main(int argc, char **argv)
{
	int v = atoi(argv[argc - 1]);
	printf("%d %d\n", scale(v, 7), scale(v + 1, 7));
	return 0;
}
"""

PART_C = r"""
#include <stdio.h>
#include <stdlib.h>
int table[64];
int lookup(int x)
{
	if (__builtin_expect(x < 64, 1))
		return table[x];
	int s = 0;
	for (int i = 0; i < x; i++) { s += table[i & 63] * i; table[i & 63] ^= s; printf("%d\n", s); }
	return s;
}
int main(int argc, char **argv)
{
	int v = atoi(argv[argc - 1]);
	printf("%d %d\n", lookup(v), lookup(v + 1));
	return 0;
}
"""


def test_only_an_ipa_clone_is_named_with_the_fix(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {"prog.c": CLONE_ONLY_C})
    names = {f.name for f in read_binary(prog).functions}
    if "scale" in names or not any(n.startswith("scale.") for n in names):
        pytest.skip(f"gcc did not make scale an IPA clone only: {sorted(names)}")
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int h(int x, int k) { return x + k; }\n"
                  "FENTRY_REPLACE(scale, h);\n")
    message = generate_errors(prog, patch)
    assert "scale.constprop.0" in message and "-flive-patching=inline-only-static" in message


def test_clone_beside_the_function_is_a_warning(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {"prog.c": PART_C}, cflags=("-O3",))
    names = {f.name for f in read_binary(prog).functions}
    if not {"lookup", "lookup.part.0"} <= names:
        pytest.skip(f"gcc did not split lookup: {sorted(names)}")
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int h(int x) { return x; }\n"
                  "FENTRY_REPLACE(lookup, h);\n")
    warnings: list[str] = []
    gen.generate(prog, patch, warnings.append)
    assert len(warnings) == 1 and "lookup.part.0" in warnings[0]
    report = check.check_binary(prog)
    assert {f["name"]: f["clone_of"] for f in report["functions"]}["lookup.part.0"] == "lookup"


def test_program_without_build_id(tmp_path: Path) -> None:
    prog = build(tmp_path / "prog", {"prog.c": PROGRAM_C}, ldflags=("-Wl,--build-id=none",))
    patch = write(tmp_path / "p.c", PATCH_C)
    message = generate_errors(prog, patch)
    assert "no GNU build-id" in message and "-Wl,--build-id" in message
    assert check.check_binary(prog)["build_id"] is None


def test_original_without_replace(pie_glibc: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", PATCH_C + "FENTRY_DECLARE_ORIGINAL(main);\n"
                  "void *x(void) { return FENTRY_ORIGINAL(main, void *); }\n")
    assert "p.c:15: FENTRY_DECLARE_ORIGINAL(main) but the patch has no FENTRY_REPLACE(main" in \
        generate_errors(pie_glibc, patch)
    # Without the declaration the compiler stops first; the message names both macros.
    write(patch, PATCH_C + "void *x(void) { return FENTRY_ORIGINAL(main, void *); }\n")
    message = generate_errors(pie_glibc, patch)
    assert "p.c:15: FENTRY_ORIGINAL(main, type) needs FENTRY_DECLARE_ORIGINAL(main);" in message
    assert "and FENTRY_REPLACE(main, ...) in the patch" in message


@pytest.mark.parametrize("content", [b"just text\n", b"\x7fELF\x02\x01\x01" + b"\0" * 30, b""])
def test_bad_binaries_give_one_line_and_no_traceback(
        tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "prog"
    binary.write_bytes(content)
    patch = write(tmp_path / "p.c", PATCH_C)
    out = tmp_path / "reg.c"
    assert gen.main(["--binary", str(binary), "--patch", str(patch), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fentry-gen: error: ") and err.count("\n") == 1, err
    assert str(binary) in err and not out.exists()


def test_debug_info_pyelftools_cannot_read_is_skipped(pie_glibc: Path, tmp_path: Path) -> None:
    # A .debug_aranges whose segment selector size is not 0: pyelftools raises
    # NotImplementedError ("Segmentation not implemented"; the ELF fuzzer found it).  DWARF
    # is optional for reading functions: the registration is written all the same.
    binary = tmp_path / "prog"
    shutil.copy(pie_glibc, binary)
    with open(binary, "rb") as stream:
        sec = ELFFile(stream).get_section_by_name(".debug_aranges")
        assert sec is not None
        offset = sec["sh_offset"]
    data = bytearray(binary.read_bytes())
    data[offset + 11] = 1  # unit_length(4) version(2) debug_info_offset(4) address_size(1)
    binary.write_bytes(bytes(data))
    out = tmp_path / "reg.c"
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nstatic int c2(int x) { return x; }\n"
                                    "FENTRY_REPLACE(compute, c2);\n")
    assert gen.main(["--binary", str(binary), "--patch", str(patch), "-o", str(out)]) == 0
    assert '.name = "compute"' in out.read_text()


def test_truncated_elf_and_missing_files(pie_glibc: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut"
    cut.write_bytes(pie_glibc.read_bytes()[:3000])
    patch = write(tmp_path / "p.c", PATCH_C)
    for binary, p in ((cut, patch), (tmp_path / "nope", patch), (pie_glibc, tmp_path / "nope.c"),
                      (tmp_path, patch)):
        assert gen.main(["--binary", str(binary), "--patch", str(p), "-o", str(tmp_path / "r.c")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fentry-gen: error: ") and err.count("\n") == 1, err


def test_gen_module_cli_reports_errors_in_one_line(pie_glibc: Path, tmp_path: Path) -> None:
    patch = write(tmp_path / "p.c", "#include <fentry.h>\nFENTRY_REPLACE(nothere, h);\n")
    proc = python("-m", "fentry_build.gen", "--binary", str(pie_glibc), "--patch", str(patch),
               "-o", str(tmp_path / "r.c"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("fentry-gen: error: ") and proc.stderr.count("\n") == 1



def test_without_a_compile_line_gcc_compiles_the_patch_with_its_folder_or_says_pass_one(
        pie_glibc: Path, tmp_path: Path) -> None:
    # What an older Meson snippet (no --) outside any compile_commands.json, or a generator run
    # by hand, gets: gcc with fentry.h's folder; the patch's "quoted" includes from its folder.
    patches, include = tmp_path / "patches", tmp_path / "include"
    patches.mkdir()
    include.mkdir()
    write(patches / "local.h", "#define LOCAL 1\n")
    write(include / "other.h", "#define OTHER 1\n")
    local = write(patches / "local.c", '#include "local.h"\n' + PATCH_C)
    out = tmp_path / "r.c"
    proc = python("-m", "fentry_build.gen", "--binary", str(pie_glibc), "--patch", str(local),
                  "-o", str(out))
    assert proc.returncode == 0 and proc.stderr == "" and ".name = \"compute\"" in out.read_text()
    other = write(patches / "other.c", '#include "other.h"\n' + PATCH_C)
    proc = python("-m", "fentry_build.gen", "--binary", str(pie_glibc), "--patch", str(other),
                  "-o", str(tmp_path / "o.c"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"fentry-gen: error: {other} does not compile: ")
    assert "other.h" in proc.stderr and "pass the patch's compile line after --" in proc.stderr
    proc = python("-m", "fentry_build.gen", "--binary", str(pie_glibc), "--patch", str(other),
                  "-o", str(tmp_path / "o.c"), "--", "gcc", f"-I{include}")
    assert proc.returncode == 0, proc.stderr


# ---- the patch-source parser ----------------------------------------------------------------


def parse(text: str, *flags: str) -> list[tuple[str, str, str | None, int]]:
    patch = scan_text(text, *flags)
    return [(r.old, r.new, r.file, r.line) for r in patch.replacements]


PREPROCESSED = r"""// FENTRY_REPLACE(a, b)
/* FENTRY_REPLACE(c, d)
   FENTRY_REPLACE(e, f) */
const char *s = "FENTRY_REPLACE(g, h)";
const char *t = "esc \" FENTRY_REPLACE(g2, h2)";
char c = '"'; char q = '\'';
#if 0
FENTRY_REPLACE(i, j);
#if 1
FENTRY_REPLACE(k, l);
#endif
FENTRY_REPLACE(m, n);
#else
FENTRY_REPLACE(live1, fix1);
#endif
#ifdef SOMETHING
FENTRY_REPLACE(live2, fix2, "x.c");
#endif
#if 1
#else
FENTRY_REPLACE(o, p);
#endif
FENTRY_REPLACE \
  (live3, /* comment */ fix3,
   "dir/y.c");
#define WRAP \
  FENTRY_REPLACE(q, r)
#define FIX(f) FENTRY_REPLACE(f, f##_fixed)
FIX(live4);
#if defined(VERSION) && VERSION >= 2
FENTRY_REPLACE(live5, fix5);
#endif
"""


def test_the_compiler_finds_the_macros_as_it_sees_them() -> None:
    # Comments, strings, dead #if groups and an unexpanded macro hold no use; a macro that
    # expands to one does; #ifdef and #if follow the patch's own flags.
    assert parse(PREPROCESSED) == [("live1", "fix1", None, 14), ("live3", "fix3", "dir/y.c", 23),
                                   ("live4", "live4_fixed", None, 29)]
    assert parse(PREPROCESSED, "-DSOMETHING", "-DVERSION=2") == [
        ("live1", "fix1", None, 14), ("live2", "fix2", "x.c", 17), ("live3", "fix3", "dir/y.c", 23),
        ("live4", "live4_fixed", None, 29), ("live5", "fix5", None, 31)]


def test_scan_records_originals() -> None:
    patch = scan_text("FENTRY_DECLARE_ORIGINAL(f);\nFENTRY_REPLACE(f, g);\n"
                      "int h(void) { return FENTRY_ORIGINAL(f, int (*)(void))(); }\n")
    assert [(o.old, o.macro, o.line, o.type) for o in patch.originals] == [
        ("f", "FENTRY_DECLARE_ORIGINAL", 1, ""), ("f", "FENTRY_ORIGINAL", 3, "int (*)(void)")]


@pytest.mark.parametrize(("text", "expected"), [
    ("FENTRY_REPLACE(a);", "fix.c:1:"),
    ("\nFENTRY_REPLACE(a, b, \"c.c\", d);", "fix.c:2: the third argument of FENTRY_REPLACE must be"),
    ("FENTRY_REPLACE(a + 1, b);", "the first argument of FENTRY_REPLACE must be"),
    ("FENTRY_REPLACE(a, &b);", "the second argument of FENTRY_REPLACE must be"),
    ("FENTRY_REPLACE(a, b, c.c);", "the third argument of FENTRY_REPLACE must be"),
    ("FENTRY_REPLACE(a, b, \"\");", "the third argument of FENTRY_REPLACE must be"),
    ("FENTRY_REPLACE(a, b);\nFENTRY_REPLACE(a, c);", "fix.c:2: FENTRY_REPLACE(a, c) replaces a again"),
    ("FENTRY_REPLACE(a, b, \"x.c\");\nFENTRY_REPLACE(a, c, \"x.c\");", "replaces a again (line 1"),
    ("FENTRY_REPLACE(a, b);\nFENTRY_REPLACE(c, b);", "b already replaces a (line 1)"),
    ("FENTRY_REPLACE(a, b", "unterminated argument list invoking macro \"FENTRY_REPLACE\""),
    ("int x; /* FENTRY_REPLACE(a, b) */", "fix.c: no FENTRY_REPLACE(old, new) in this patch"),
    ("#if 0\nFENTRY_REPLACE(a, b);\n#endif\n", "none under a false #if either"),
])
def test_scan_errors(text: str, expected: str) -> None:
    with pytest.raises(FentryError) as e:
        parse(text)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_same_old_in_two_files_is_allowed() -> None:
    assert len(parse('FENTRY_REPLACE(a, b, "x.c");\nFENTRY_REPLACE(a, c, "y.c");')) == 2


# ---- check ----------------------------------------------------------------------------------


def test_check_json_cli(pie_glibc: Path) -> None:
    proc = python("-m", "fentry_build", "check", str(pie_glibc), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["instrumented"] is True
    assert report["build_id"] == read_binary(pie_glibc).build_id_hex
    compute = next(f for f in report["functions"] if f["name"] == "compute")
    assert compute["addr"] == function(pie_glibc, "compute").addr
    assert (compute["site_form"], compute["site_offset"], compute["site_len"]) == ("ff 15", 0, 6)
    helper = next(f for f in report["functions"] if f["name"] == "helper")
    assert helper["file"] == "prog.c"
    assert report["uninstrumented"] == 0


def test_check_uninstrumented_program(tmp_path: Path) -> None:
    src = write(tmp_path / "plain.c", "int main(void) { return 0; }\n")
    prog = tmp_path / "plain"
    run(["gcc", "-O2", "-o", str(prog), str(src)])
    report = check.check_binary(prog)
    assert report["instrumented"] is False and report["functions"] == []
    assert report["uninstrumented"] == 1  # main; start-up code is not counted
    assert "NOT instrumented" in check.format_report(report)
    proc = python("-m", "fentry_build", "check", str(prog))
    assert proc.returncode == 1 and "-pg -mfentry" in proc.stdout


def test_check_text_report(pie_glibc: Path) -> None:
    text = check.format_report(check.check_binary(pie_glibc))
    assert "instrumented" in text.splitlines()[0]
    assert re.search(r"0x[0-9a-f]+\s+ff 15\s+\+0:6\s+compute", text)
