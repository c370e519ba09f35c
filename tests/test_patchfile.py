"""The code that runs is exactly the code that was checked (issue 11 §3, §4).

A patch is read once, through the checked descriptor, into a sealed private copy (a
memfd) whose SHA-256 `list` reports; the dynamic linker loads that copy under a name no
loaded object answers to.  So a redeploy that overwrites, truncates or deletes the file
after `apply` changes nothing in the process, and a library that is not a patch never
gets to run its constructors.  Real server, real CLI, both modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import fentry_build
from fentry_build import paths

from support.builds import EXAMPLE, ServerBuild, build_patch, run
from support.cli import cli
from support.servers import (BUG_REQUEST, BUGGY, FIXED, LOWER, LOWER_OLD, LOWER_V2, MODES,
                             Server, ask, assert_buggy, assert_fixed, assert_v2, proc_status,
                             start_server)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(srv: Server) -> list[dict[str, object]]:
    out = cli("list", "--pid", str(srv.pid), "--json")
    assert out.returncode == 0, out.stderr
    patches: list[dict[str, object]] = json.loads(out.stdout)["patches"]
    return patches


def apply(srv: Server, patch: Path) -> subprocess.CompletedProcess[str]:
    return cli("apply", "--pid", str(srv.pid), str(patch), "--json")


def refused(out: subprocess.CompletedProcess[str], *words: str) -> str:
    """A one-line refusal naming every one of `words`."""
    assert out.returncode != 0 and out.stdout == "", out
    line = out.stderr
    assert line.count("\n") == 1 and line.startswith("fentry-build: error: "), line
    for w in words:
        assert w in line, line
    return line


@pytest.mark.parametrize("mode", MODES)
def test_overwriting_truncating_or_deleting_the_applied_file_changes_nothing(
        built: ServerBuild, tmp_path: Path, started: list[Server], mode: str) -> None:
    v1, v2 = built.patches["fix_parse"], built.patches["fix_parse_v2"]
    deployed = tmp_path / "fix_parse.so"
    shutil.copyfile(v1, deployed)
    srv = start_server(built.binary, mode)
    started.append(srv)
    assert apply(srv, deployed).returncode == 0
    assert_fixed(srv)
    maps = Path(f"/proc/{srv.pid}/maps").read_text()
    assert "/memfd:fentry:fix_parse.so" in maps and str(deployed) not in maps

    # A redeploy with cp: the same inode, rewritten in place with another version.
    shutil.copyfile(v2, deployed)
    assert_fixed(srv)  # still v1: v2 would also answer lower-case requests
    assert ask(srv.port, LOWER) == LOWER_OLD
    (p,) = listing(srv)
    assert (p["name"], p["state"], p["sha256"]) == ("fix_parse", "active", sha256(v1))
    assert sha256(deployed) != p["sha256"]

    # Cut short: list and revert still work, the process keeps running the copy.
    with open(deployed, "r+b") as f:
        f.truncate(100)
    assert_fixed(srv)
    assert cli("revert", "--pid", str(srv.pid), "fix_parse").returncode == 0
    assert_buggy(srv)
    refused(apply(srv, deployed), str(deployed), "truncated")
    assert_buggy(srv)
    assert [(p["name"], p["state"]) for p in listing(srv)] == [("fix_parse", "reverted")]

    # Gone: a copy of v1 under the same path applies again.
    deployed.unlink()
    refused(apply(srv, deployed), str(deployed), "does not exist")
    shutil.copyfile(v1, deployed)
    assert apply(srv, deployed).returncode == 0
    assert_fixed(srv)
    assert listing(srv)[0]["sha256"] == sha256(v1)


def test_the_descriptor_table_is_grown_before_threads_so_a_first_apply_never_waits(
        built: ServerBuild, started: list[Server]) -> None:
    """The copy's descriptor is 1000 or above (debuggers meet nothing there).  Growing the
    table of a process with threads (the control thread) waits for an RCU grace period in
    the kernel; the shim grows it at start, while the process has one thread, so the
    table already holds 1000 when the first patch comes and does not grow for it."""
    srv = start_server(built.binary, "dispatch")
    started.append(srv)
    before = int(proc_status(srv.pid)["FDSize"])
    assert before > 1000
    assert apply(srv, built.patches["fix_parse"]).returncode == 0
    assert_fixed(srv)
    copies = [int(fd.name) for fd in Path(f"/proc/{srv.pid}/fd").iterdir()
              if "memfd:fentry:" in os.readlink(fd)]
    assert copies and min(copies) >= 1000
    assert int(proc_status(srv.pid)["FDSize"]) == before


@pytest.mark.stress
@pytest.mark.parametrize("mode", MODES)
def test_a_file_rewritten_while_it_is_being_loaded_is_loaded_whole_or_refused(
        built: ServerBuild, tmp_path: Path, started: list[Server], mode: str) -> None:
    v1 = built.patches["fix_parse"]
    good = v1.read_bytes()
    deployed = tmp_path / "fix_parse.so"
    deployed.write_bytes(good)
    deployed.chmod(0o755)
    srv = start_server(built.binary, mode)
    started.append(srv)
    stop = threading.Event()
    rewrites = 0

    def rewrite() -> None:
        nonlocal rewrites
        while not stop.is_set():  # truncate to nothing, then write the file back slowly
            with open(deployed, "r+b") as f:
                f.truncate(0)
                for i in range(0, len(good), 4096):
                    f.write(good[i:i + 4096])
                    f.flush()
            rewrites += 1
            stop.wait(0.005)  # whole for a moment: some applies find it complete

    writer = threading.Thread(target=rewrite)
    writer.start()
    loaded = refusals = 0
    try:
        for _ in range(60):
            out = apply(srv, deployed)
            if out.returncode == 0:
                assert json.loads(out.stdout)["sha256"] == hashlib.sha256(good).hexdigest()
                loaded += 1
                assert_fixed(srv)
                assert cli("revert", "--pid", str(srv.pid), "fix_parse").returncode == 0
                # The loaded copy stays (reverted); an identical file re-activates it.
            else:
                refused(out, str(deployed))
                refusals += 1
            assert srv.alive()
    finally:
        stop.set()
        writer.join()
    print(f"{mode}: {loaded} loads, {refusals} refusals, {rewrites} rewrites")
    assert loaded + refusals == 60 and rewrites > 0
    assert ask(srv.port, BUG_REQUEST) == BUGGY
    assert all(p["sha256"] == hashlib.sha256(good).hexdigest() for p in listing(srv))


@pytest.fixture(scope="module")
def not_a_patch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared library with a constructor that leaves a mark, and the mark's path."""
    d = tmp_path_factory.mktemp("notapatch")
    src = d / "lib_ctor.c"
    mark = d / "constructor-ran"
    src.write_text('#include <stdio.h>\n'
                   '__attribute__((constructor)) static void leave_mark(void)\n'
                   f'{{ FILE *f = fopen("{mark}", "w"); if (f) fclose(f); }}\n'
                   'int helper(int x) { return x + 1; }\n')
    lib = d / "lib_ctor.so"
    run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)])
    lib.chmod(0o755)
    return lib, mark


@pytest.mark.parametrize("mode", MODES)
def test_a_library_that_is_not_a_patch_is_refused_before_any_of_its_code_runs(
        built: ServerBuild, not_a_patch: tuple[Path, Path], started: list[Server],
        mode: str) -> None:
    lib, mark = not_a_patch
    srv = start_server(built.binary, mode)
    started.append(srv)
    refused(apply(srv, lib), str(lib), "not a fentry patch", "fentry_patch")
    assert not mark.exists()  # its constructor never ran
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if libc.exists():  # the library the process already uses
        refused(apply(srv, libc), "not a fentry patch")
    assert listing(srv) == []
    assert_buggy(srv)


@pytest.mark.parametrize("mode", MODES)
def test_an_object_glibc_keeps_after_unload_never_stands_in_for_the_next_patch(
        built: ServerBuild, tmp_path: Path, started: list[Server], mode: str) -> None:
    """A patch linked -z nodelete stays mapped after unload, and glibc still answers to the
    name it was opened by; the next patch gets a descriptor of the same number."""
    sticky = build_patch(built.binary, EXAMPLE / "patches" / "fix_parse.c",
                         tmp_path / "sticky.so", cflags=[f"-I{EXAMPLE}", "-Wl,-z,nodelete"])
    sticky.chmod(0o755)
    srv = start_server(built.binary, mode)
    started.append(srv)
    pid = str(srv.pid)
    for _ in range(3):
        assert cli("apply", "--pid", pid, str(sticky)).returncode == 0
        assert_fixed(srv)
        assert cli("revert", "--pid", pid, "sticky").returncode == 0
        out = cli("unload", "--pid", pid, "sticky")
        assert out.returncode == 0, out.stderr
        assert listing(srv) == []
        out = cli("apply", "--pid", pid, str(built.patches["fix_parse_v2"]), "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["sha256"] == sha256(built.patches["fix_parse_v2"])
        assert_v2(srv)  # v2's code runs, not the object left behind
        assert ask(srv.port, LOWER) == LOWER_V2
        assert cli("revert", "--pid", pid, "fix_parse_v2").returncode == 0
        assert cli("unload", "--pid", pid, "fix_parse_v2").returncode == 0


@pytest.mark.needs_root
def test_a_pid_namespace_sharing_its_parents_proc_loads_the_patch_it_checked(
        built: ServerBuild, tmp_path: Path) -> None:
    """In `unshare --pid --fork` without a /proc of its own, the server is pid 1 of its
    namespace while /proc/1 is the machine's init: a patch must be named through
    /proc/self, never /proc/<getpid()>."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FENTRY_")}
    env.update({"FENTRY_CONTROL": "0", "FENTRY_PATCHES": str(built.patches["fix_parse"])})
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", str(built.binary), "0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert ask(port, BUG_REQUEST) == FIXED
        assert ask(port, LOWER) == LOWER_OLD
    finally:
        proc.kill()  # --kill-child: the server gets SIGKILL when unshare dies
        _, err = proc.communicate(timeout=30)
    assert b"not loaded" not in err, err


def test_the_shim_names_no_file_of_its_own_through_its_pid() -> None:
    """grep: no path built from the process's own pid anywhere in the shim or the package."""
    package = Path(fentry_build.__file__).resolve().parent
    offenders = []
    for path in [*paths.shim_dir().rglob("*.[ch]"), *package.rglob("*.py")]:
        text = path.read_text()
        for needle in ('"/proc/%d', '"/proc/%s', "/proc/{os.getpid()}", "/proc/{getpid()}"):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
    assert offenders == []


def test_the_sha256_of_the_shim_matches_pythons(tmp_path: Path) -> None:
    """The shim's own SHA-256 (shim/core/sha256.c; with the SHA instructions of
    arch/x86_64/sha256_ni.c where the CPU has them) against hashlib, on edge lengths, fed
    whole blocks and byte by byte; the portable rounds alone too."""
    shim = paths.shim_dir()
    driver = tmp_path / "sha.c"
    driver.write_text('#include <stdio.h>\n#include "core/sha256.h"\n'
                      '#include "arch/x86_64/sha256_ni.h"\n'
                      'int main(int c, char **v) { struct fentry_sha256 s; unsigned char d[32], '
                      'b[1000]; size_t n; FILE *f = fopen(v[1], "rb"); fentry_sha256_init(&s);\n'
                      'while ((n = fread(b, 1, 1 + (size_t)(c > 2 ? 0 : 700), f)) > 0) '
                      'fentry_sha256_update(&s, b, n);\n'
                      'fentry_sha256_final(&s, d); for (int i = 0; i < 32; i++) '
                      'printf("%02x", d[i]); printf(" ni=%d", fentry_sha256_ni_usable()); return 0; }\n')
    flags = {"dispatch": [], "portable": ["-DFENTRY_SHA256_PORTABLE"]}
    exes = {}
    for way, extra_flags in flags.items():
        exes[way] = tmp_path / f"sha_{way}"
        run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", *extra_flags, f"-I{shim}",
             f"-I{paths.include_dir()}", "-o", str(exes[way]), str(driver),
             str(shim / "core" / "sha256.c"), str(shim / "arch" / "x86_64" / "sha256_ni.c")])
    cpu_has_sha = " sha_ni " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 100_003):
        data = os.urandom(n)
        f = tmp_path / f"d{n}"
        f.write_bytes(data)
        for way, exe in exes.items():
            for extra in ([], ["bytewise"]):
                digest, ni = run([str(exe), str(f), *extra]).stdout.split()
                assert digest == hashlib.sha256(data).hexdigest(), (n, way, extra)
                assert ni == f"ni={int(cpu_has_sha)}"

