"""Facts that two languages need, each kept in one place or held to it here.

The C side (shim/meson.build, shim/include/fentry.h) and the Python side
(fentry_build.build.flags, fentry_build.build.sharedshim, the generator) state some facts
twice because each build system and each language needs them in its own form.  Each test
below fails, naming both places, when they drift apart.  The readers here parse only our
own files' known shapes (a Meson list literal, `#define NAME number`, enumerator lines).
"""

from __future__ import annotations

import re
from pathlib import Path

from fentry_build import paths
from fentry_build.binary.elf import SiteForm
from fentry_build.build import flags, sharedshim
from fentry_build.generator import main as generator
from fentry_build.generator.patchsrc import CALLBACK_MACROS

MESON_BUILD = paths.shim_dir() / "meson.build"
FENTRY_H = paths.include_dir() / "fentry.h"


def meson_list(name: str, text: str | None = None) -> list[str]:
    """The string items of `name = [ ... ]` in shim/meson.build."""
    text = MESON_BUILD.read_text() if text is None else text
    m = re.search(rf"^{re.escape(name)}\s*=\s*\[(.*?)\]", text, re.M | re.S)
    assert m is not None, f"{name} = [...] not found in {MESON_BUILD}"
    return re.findall(r"'([^']*)'", m.group(1))


def meson_call_list(call: str, argument: str) -> list[str]:
    """The string items of `argument: [ ... ]` inside `call(...)` in shim/meson.build."""
    text = MESON_BUILD.read_text()
    start = text.index(call + "(")
    m = re.compile(rf"\b{re.escape(argument)}:\s*\[(.*?)\]", re.S).search(text, start)
    assert m is not None, f"{call}(... {argument}: [...]) not found in {MESON_BUILD}"
    return re.findall(r"'([^']*)'", m.group(1))


def header_define(name: str) -> int:
    m = re.search(rf"^#define {name} (\d+)\b", FENTRY_H.read_text(), re.M)
    assert m is not None, f"#define {name} not found in {FENTRY_H}"
    return int(m.group(1))


# ---- flags ---------------------------------------------------------------------------------


def test_instrumentation_flags_are_the_same_for_meson_and_python() -> None:
    assert meson_list("fentry_instrument_args") == flags.LINKED_INSTRUMENT_ARGS


def test_program_link_flags_are_the_same_for_meson_and_python() -> None:
    assert meson_call_list("fentry_dep = declare_dependency", "link_args") == flags.PROGRAM_LINK_ARGS


def test_unlinked_flags_leave_out_only_the_site_list() -> None:
    # shim/meson.build computes fentry_unlinked_args by dropping -mrecord-mcount in a loop.
    text = MESON_BUILD.read_text()
    assert "if arg != '-mrecord-mcount'" in text
    assert flags.UNLINKED_INSTRUMENT_ARGS == [a for a in flags.LINKED_INSTRUMENT_ARGS
                                              if a != "-mrecord-mcount"]
    assert meson_call_list("instrument_dep = declare_dependency", "link_args") == \
        [a for a in flags.PROGRAM_LINK_ARGS if "export-dynamic" not in a]


def test_the_shim_is_built_with_the_same_warnings_everywhere() -> None:
    meson_args = meson_call_list("fentry_shim_lib = static_library", "c_args")
    assert set(meson_args) <= set(flags.SHIM_CFLAGS)
    assert {"-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE"} <= set(meson_args)
    assert "-pg" not in flags.SHIM_CFLAGS


# ---- the shim's sources ---------------------------------------------------------------------


def test_the_shim_source_list_is_every_source_of_the_tree() -> None:
    text = MESON_BUILD.read_text()
    m = re.search(r"fentry_shim_sources = files\((.*?)\)", text, re.S)
    assert m is not None, "fentry_shim_sources = files(...) not found"
    listed = sorted(re.findall(r"'([^']+)'", m.group(1)))
    on_disk = sorted(p.relative_to(paths.shim_dir()).as_posix() for p in sharedshim.shim_sources())
    assert listed == on_disk, "shim/meson.build's fentry_shim_sources and the files under shim/ differ"


def test_every_shim_file_opens_with_what_it_holds() -> None:
    for p in sorted(paths.shim_dir().rglob("*")):
        if p.suffix in (".c", ".h", ".S"):
            head = p.read_text().lstrip("/* \n").split("\n", 1)[0]
            assert head.startswith(p.name + " - "), f"{p}: first line {head!r}"


def test_each_internal_header_is_self_contained(tmp_path: Path) -> None:
    import subprocess

    shim = paths.shim_dir()
    for header in sorted(shim.rglob("*.h")):
        rel = header.relative_to(shim).as_posix()
        src = tmp_path / "one.c"
        src.write_text(f'#include "{rel}"\n#include "{rel}"\n')  # and guarded against twice
        proc = subprocess.run(["gcc", *flags.SHIM_CFLAGS, *[f"-I{d}" for d in paths.shim_include_dirs()],
                               "-fsyntax-only", str(src)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{rel}: {proc.stderr}"


# ---- the patch ABI (fentry.h) --------------------------------------------------------------


def test_build_id_max_is_the_headers() -> None:
    assert generator.BUILD_ID_MAX == header_define("FENTRY_BUILD_ID_MAX")


def test_site_forms_are_the_headers() -> None:
    text = FENTRY_H.read_text()
    body = re.search(r"enum fentry_site_form \{(.*?)\};", text, re.S)
    assert body is not None
    found = {}
    for name, value, comment in re.findall(r"(FENTRY_SITE_\w+) = (\d+),\s*/\*(.*?)\*/", body.group(1)):
        found[name] = (int(value), comment.strip())
    assert set(found) == {f.c_name for f in SiteForm}
    for form in SiteForm:
        _, comment = found[form.c_name]
        operand = " <imm32>" if form.prepared else " <rel32>"  # a test's immediate
        assert comment.startswith(form.value + operand), (form, comment)
        length = re.search(r"\((\d+)(?: bytes)?\)\s*$", comment)
        assert length is not None and int(length.group(1)) == form.length, (form, comment)


def test_the_spin_operand_bytes_are_the_shims() -> None:
    # Placement (generator) and preparation (build) compute with them; poke.c writes them.
    from fentry_build.binary.elf import SPIN_REL8

    text = (paths.shim_dir() / "arch" / "x86_64" / "sites.h").read_text()
    found = {int(n): int(v, 16) for n, v in re.findall(r"#define SITE_REL8_(\d) (0x[0-9a-f]+)", text)}
    assert found == SPIN_REL8


def test_the_scan_records_fentry_h_writes_are_the_ones_the_generator_reads() -> None:
    # fentry.h (FENTRY_GEN_SCAN) writes records of these kinds; generator/patchsrc.py reads them.
    from fentry_build.generator import patchsrc, scan

    text = FENTRY_H.read_text()
    written = set(re.findall(r'FENTRY__RECORD\("([\w.]+)"', text))
    written |= set(re.findall(r'FENTRY__USE\("(\w+)"', text))
    read = {"replace", "replace_unchecked", "original", "declare_original", "ref", "replace_all",
            "fentry.h", *patchsrc.CALLBACK_KINDS}
    assert written == read
    assert f'section("{scan.SECTION}")' in text and scan.RECORD_MARK_C in text
    assert scan.RECORD_MARK == scan.RECORD_MARK_C.strip('"').encode().decode(
        "unicode_escape").encode("latin-1")


def test_callback_macros_are_the_headers() -> None:
    text = FENTRY_H.read_text()
    for macro, field in CALLBACK_MACROS.items():
        m = re.search(rf"#define {macro}\(fn\).*?fentry_cb__(\w+) = fn", text, re.S)
        assert m is not None and m.group(1) == field, macro
        kind = "fentry_pre_patch_fn" if field == "pre_patch" else "fentry_callback_fn"
        assert re.search(rf"const {kind} \*{field};", text), field
    fields = set(re.findall(r"const fentry_\w+_fn \*(\w+);", text))
    assert fields == set(CALLBACK_MACROS.values())


def test_the_registration_names_the_headers_abi_version() -> None:
    template = (paths.templates_dir() / "registration.c.j2").read_text()
    assert ".abi_version = FENTRY_ABI_VERSION," in template
    assert header_define("FENTRY_ABI_VERSION") >= 1


def header_string(name: str) -> str:
    m = re.search(rf'^#define {name} "([^"]*)"', FENTRY_H.read_text(), re.M)
    assert m is not None, f'#define {name} "..." not found in {FENTRY_H}'
    return m.group(1)


def test_the_patch_directory_rule_is_the_headers() -> None:
    from fentry_build.fleet import patchdir

    assert patchdir.ENV == header_string("FENTRY_PATCH_DIR_ENV")
    assert patchdir.SYSTEM_DIR == header_string("FENTRY_PATCH_DIR_SYSTEM")
    assert patchdir.USER_DIR_NAME == header_string("FENTRY_PATCH_DIR_NAME")


def test_the_descriptor_layout_read_by_patchinfo_is_the_headers(tmp_path: Path) -> None:
    import subprocess

    from fentry_build.binary import patchinfo

    assert patchinfo.PATCH_SYMBOL == header_string("FENTRY_PATCH_SYMBOL")
    assert patchinfo.ABI_VERSION == header_define("FENTRY_ABI_VERSION")
    assert patchinfo.BUILD_ID_MAX == header_define("FENTRY_BUILD_ID_MAX")
    members = {"abi_version": patchinfo.OFFSET_ABI_VERSION, "nfuncs": patchinfo.OFFSET_NFUNCS,
               "build_id_len": patchinfo.OFFSET_BUILD_ID_LEN, "build_id": patchinfo.OFFSET_BUILD_ID}
    src = tmp_path / "offsets.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <fentry.h>\nint main(void)\n{\n"
                   + "".join(f'\tprintf("{m} %zu\\n", offsetof(struct fentry_patch, {m}));\n'
                             for m in members)
                   + "\treturn 0;\n}\n")
    exe = tmp_path / "offsets"
    subprocess.run(["gcc", f"-I{paths.include_dir()}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert dict(line.split() for line in out.splitlines()) == {m: str(v) for m, v in members.items()}
