"""The installed package carries what a user's build needs, and its commands run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fentry_build
from fentry_build import paths

from support.builds import ServerBuild
from support.cli import cli
from support.servers import Server, start_server


def test_tests_run_against_the_installed_wheel_when_asked() -> None:
    if os.environ.get("FENTRY_TEST_INSTALLED") != "1":
        # Developer runs against the source tree; scripts/test.sh sets the variable.
        assert (Path(fentry_build.__file__).parent.parent / "shim").is_dir()
        return
    pkg = Path(fentry_build.__file__).resolve().parent
    assert "site-packages" in pkg.parts
    assert paths.data_dir() == pkg / "data"


def test_package_carries_shim_templates_and_examples() -> None:
    for rel in ["shim/include/fentry.h", "shim/arch/x86_64/entry.S", "shim/meson.build",
                "templates/registration.c.j2", "templates/meson/fentry.wrap.j2",
                "templates/project/meson.build.j2", "examples/hello/hello.c",
                "examples/hello/meson.build"]:
        assert (paths.data_dir() / rel).is_file(), rel


def test_console_script_and_module_entry_point_agree() -> None:
    by_module = subprocess.run([sys.executable, "-m", "fentry_build", "--version"],
                               capture_output=True, text=True, check=True)
    assert by_module.stdout.strip() == f"fentry-build {fentry_build.__version__}"
    script = Path(sys.executable).parent / "fentry-build"
    if os.environ.get("FENTRY_TEST_INSTALLED") == "1":
        by_script = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                   check=True)
        assert by_script.stdout == by_module.stdout


# ---- the package's layers import one way ----------------------------------------------------


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(fentry_build.__file__).resolve().parent.parent)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd="/", timeout=120)


def _modules() -> list[str]:
    root = Path(fentry_build.__file__).resolve().parent
    names = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if "data" not in parts and rel.name != "__main__":
            names.append(".".join(parts))
    return names


def test_import_fentry_build_imports_nothing_else() -> None:
    proc = _fresh("import sys, fentry_build; "
                  "print(sorted(m for m in sys.modules if m.startswith('fentry_build')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['fentry_build']"
    proc = _fresh("import sys, fentry_build; print('SCons' in sys.modules, 'elftools' in sys.modules, "
                  "'jinja2' in sys.modules)")
    assert proc.stdout.strip() == "False False False"


# What a command aimed at one process must not import: the fleet's thread pool (and the
# logging it brings), dataclasses (and inspect), patch-file reading (hashlib, pyelftools),
# the build and generator layers; nor typing, pathlib (with urllib.parse and ipaddress) and
# shutil, which argparse imports for the terminal's width (fentry_build/record.py, cli.py's
# _Parser).  Start-up time is measured in benchmarks/ (rows_cli.py); this is the behaviour
# that keeps it low.
_HEAVY = ("typing", "pathlib", "shutil", "urllib",
          "concurrent.futures", "dataclasses", "inspect", "hashlib", "elftools", "jinja2", "SCons",
          "fentry_build.fleet.multi", "fentry_build.fleet.patchdir", "fentry_build.binary",
          "fentry_build.build", "fentry_build.generator")


@pytest.mark.parametrize("argv", [["status"], ["list"], ["list", "--history"], ["apply", "PATCH"],
                                  ["revert", "fix_parse"], ["unload", "fix_parse"]])
def test_a_command_for_one_process_imports_only_its_client(built: ServerBuild,
                                                           started: list[Server],
                                                           argv: list[str]) -> None:
    srv = start_server(built.binary, "jump")
    started.append(srv)
    argv = [str(built.patches["fix_parse"]) if a == "PATCH" else a for a in argv]
    if argv[0] in ("revert", "unload"):  # something to revert or unload
        assert cli("apply", "--pid", str(srv.pid), str(built.patches["fix_parse"])).returncode == 0
        if argv[0] == "unload":
            assert cli("revert", "--pid", str(srv.pid), "fix_parse").returncode == 0
    code = ("import sys\nfrom fentry_build.cli import main\n"
            f"rc = main({[*argv, '--pid', str(srv.pid)]!r})\n"
            f"heavy = sorted(m for m in sys.modules if m.startswith({_HEAVY!r}))\n"
            "print('exit', rc, 'heavy', heavy, file=sys.stderr)")
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "exit 0 heavy []", proc.stderr


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """An import loop shows as a module that fails when it is the first one imported."""
    modules = _modules()
    assert "fentry_build.generator.main" in modules and "fentry_build.client.attach" in modules
    for name in modules:
        proc = _fresh(f"import {name}")
        assert proc.returncode == 0, f"import {name}: {proc.stderr}"


def test_the_public_entry_points_of_older_layouts_still_work() -> None:
    proc = _fresh("import fentry_build; print(fentry_build.scons.TOOLPATH); "
                  "import fentry_build.scons as s; print(callable(s.generate) and callable(s.exists))")
    assert proc.returncode == 0, proc.stderr
    toolpath, ok = proc.stdout.split()
    assert Path(toolpath, "fentry.py").is_file() and ok == "True"
    gen = subprocess.run([sys.executable, "-m", "fentry_build.gen", "--help"], capture_output=True,
                         text=True, cwd="/", timeout=120)
    assert gen.returncode == 0 and "--binary" in gen.stdout


def test_the_gdb_script_needs_only_the_standard_library() -> None:
    import ast

    script = Path(fentry_build.__file__).resolve().parent / "client" / "attach_gdb.py"
    imported = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported - {"gdb", "__future__"} <= set(sys.stdlib_module_names), imported


@pytest.mark.parametrize("command", ["apply", "revert", "unload", "list", "status", "ps", "install",
                                     "uninstall", "archive", "new-patch", "patch-from-diff"])
def test_each_command_a_user_types_shows_an_example_and_documents_json(command: str) -> None:
    """--help of each command: an example (or, for the verbs on processes, how to name them),
    and every option, --json included, says what it does."""
    shown = subprocess.run([sys.executable, "-m", "fentry_build", command, "--help"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "example" in shown.stdout or "processes: --pid PID" in shown.stdout
    if "--json" in shown.stdout:
        assert any(line.strip().startswith("--json ") for line in shown.stdout.splitlines()), \
            shown.stdout


def test_a_command_line_parses_the_same_with_its_command_alone() -> None:
    """main() builds only the named command's parser; it must mean what the full one means,
    and the top level (--help, a misspelt command) still knows every command."""
    from fentry_build import cli as cli_mod

    lines = [["apply", "--pid", "7", "--pid", "8", "p.so", "--json", "--dry-run", "--timeout", "3"],
             ["revert", "--all", "--program", "/srv/x", "fix", "--if-applied"],
             ["status", "--pid", "7"], ["list", "--pid", "7", "--history"],
             ["ps", "--build-id", "ab12"], ["check", "prog", "--json"], ["meson-init"],
             ["archive", "--list"], ["new-patch", "n", "--function", "f", "--binary", "b"]]
    for words in lines:
        full, alone = (vars(cli_mod._parser(c).parse_args(words)) for c in (None, words[0]))
        assert full == alone, words
    for words in (["--help"], ["--version"], ["nosuch", "--pid", "1"]):
        shown = subprocess.run([sys.executable, "-m", "fentry_build", *words], capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == (2 if words[0] == "nosuch" else 0)
        if words[0] != "--version":
            out = shown.stdout + shown.stderr
            assert all(name in out for name in cli_mod._COMMANDS), out


def test_a_record_is_a_read_only_value_compared_and_shown_by_its_fields() -> None:
    """The client's values (fentry_build/record.py) behave as the NamedTuples they replace,
    but for being tuples: equal and hashed by their fields, shown with them, read-only."""
    from fentry_build.client.channel import Place, Target
    from fentry_build.fleet.targets import Selection

    a, b = Target(1, 1, 0, "S", "x"), Target(1, 1, 0, "S", "x")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Target(2, 2, 0, "S", "x") and a != Place("/p", "/p")
    assert repr(a) == "Target(pid=1, own_pid=1, euid=0, state='S', name='x')"
    with pytest.raises(AttributeError, match="Target.pid is read-only"):
        a.pid = 2
    assert Selection() == Selection((), False, None, None) and not Selection().single
