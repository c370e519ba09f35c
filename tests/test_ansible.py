"""The Ansible module fentry.live.fentry_patch (ansible/, docs/fleet.md) run by ansible-core
against localhost (connection: local) on a real pre-forking server: apply, an idempotent
re-run, check mode, diff, revert, the patch directory, a refusal, and the rollout playbook
of docs/fleet.md."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import fleet
from support.builds import ServerBuild
from support.fleet import Prefork, clean_env
from support.playbooks import run_module, run_playbook
from support.servers import Server, assert_buggy, start_server

from fentry_build.binary.patchinfo import read_patch
from fentry_build.client import control

pytestmark = pytest.mark.slow  # each ansible run starts ansible-core afresh

WORKERS = 2
ORIGINAL, PATCHED = 2, 101


@pytest.fixture(scope="module")
def prefork_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fleet.prefork_build(tmp_path_factory)


@pytest.fixture
def prefork(prefork_build: tuple[Path, Path], tmp_path: Path) -> Iterator[Prefork]:
    srv = Prefork(prefork_build[0], WORKERS, tmp_path / "state")
    yield srv
    assert srv.stop() == 0


def _states(srv: Prefork) -> dict[int, list[tuple[str, str]]]:
    return {pid: [(p["name"], p["state"]) for p in control.list_patches(pid)["patches"]]
            for pid in srv.pids}


def _wait_workers(srv: Prefork, value: int) -> None:
    for worker in srv.workers:
        srv.wait_value(worker, value)


def test_present_applies_and_a_second_run_changes_nothing(prefork: Prefork, prefork_build: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    patch = prefork_build[1]
    rc, result, out = run_module(tmp_path / "a", {"src": str(patch), "state": "present"})
    assert rc == 0, out
    assert result["changed"] is True and result["failed_pids"] == []
    assert sorted(p["pid"] for p in result["processes"]) == sorted(prefork.pids)
    assert all(p["ok"] and p["changed"] for p in result["processes"])
    _wait_workers(prefork, PATCHED)

    rc, again, out = run_module(tmp_path / "a", {"src": str(patch), "state": "present"})
    assert rc == 0, out
    assert again["changed"] is False
    assert [p["changed"] for p in again["processes"]] == [False] * len(prefork.pids)


def test_check_mode_and_diff_predict_and_change_nothing(prefork: Prefork, prefork_build: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    patch = prefork_build[1]
    rc, result, out = run_module(tmp_path / "a", {"src": str(patch)}, check=True, diff=True)
    assert rc == 0, out
    assert result["changed"] is True
    assert all(p["dry_run"] for p in result["processes"])
    for pid in prefork.pids:  # --diff: each process before and after
        assert f"-pid {pid}: not applied" in out and f"+pid {pid}: applied" in out, out
    assert all(s == [] for s in _states(prefork).values())
    _wait_workers(prefork, ORIGINAL)

    # Applied for real, then absent in check mode: it would revert, and nothing is reverted.
    assert run_module(tmp_path / "a", {"src": str(patch)})[0] == 0
    rc, result, out = run_module(tmp_path / "a", {"src": str(patch), "state": "absent"}, check=True)
    assert rc == 0, out
    assert result["changed"] is True
    assert all(s == [("fleet_prefork_patch", "active")] for s in _states(prefork).values())
    _wait_workers(prefork, PATCHED)


def test_absent_reverts_everywhere_and_is_idempotent(prefork: Prefork, prefork_build: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    prog, patch = prefork_build
    assert run_module(tmp_path / "a", {"src": str(patch)})[0] == 0
    _wait_workers(prefork, PATCHED)
    args = {"src": str(patch), "state": "absent", "program": str(prog)}
    rc, result, out = run_module(tmp_path / "a", args)
    assert rc == 0, out
    assert result["changed"] is True and result["removed"] == []
    assert all(p["ok"] and p["changed"] for p in result["processes"])
    _wait_workers(prefork, ORIGINAL)
    assert all(s == [("fleet_prefork_patch", "reverted")] for s in _states(prefork).values())
    rc, again, out = run_module(tmp_path / "a", args)
    assert rc == 0 and again["changed"] is False, out


def test_installed_puts_it_in_the_patch_directory_and_applies_it(
        prefork: Prefork, prefork_build: tuple[Path, Path], tmp_path: Path) -> None:
    patch = prefork_build[1]
    info = read_patch(patch)
    pdir = tmp_path / "patches"
    args = {"src": str(patch), "state": "installed", "patch_dir": str(pdir)}
    rc, result, out = run_module(tmp_path / "a", args)
    assert rc == 0, out
    installed = pdir / info.build_id / "fleet_prefork_patch.so"
    assert result["changed"] is True and result["installed"]["path"] == str(installed)
    assert installed.read_bytes() == patch.read_bytes()
    assert sorted(p["pid"] for p in result["processes"]) == sorted(prefork.pids)
    _wait_workers(prefork, PATCHED)
    rc, again, out = run_module(tmp_path / "a", args)
    assert rc == 0 and again["changed"] is False, out

    rc, gone, out = run_module(tmp_path / "a", {**args, "state": "absent"})
    assert rc == 0, out
    assert gone["changed"] is True and [r["path"] for r in gone["removed"]] == [str(installed)]
    assert not installed.exists()
    _wait_workers(prefork, ORIGINAL)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> ServerBuild:
    return fleet.server_build(tmp_path_factory)


def test_a_refusing_process_fails_the_task_and_changes_nothing(
        servers: ServerBuild, started: list[Server], tmp_path: Path) -> None:
    srv = start_server(servers.binary, "jump")
    started.append(srv)
    # The other build's fix, aimed at this program: the process refuses it (wrong build).
    rc, result, out = run_module(tmp_path / "a", {"src": str(servers.other_fix),
                                                  "program": str(servers.binary)})
    assert rc != 0
    assert "FAILED!" in out and result["failed_pids"] == [srv.pid]
    assert re.match(rf"1 of 1 processes refused; pid {srv.pid}: apply fix_parse.so to pid {srv.pid}: "
                    r".*another build", result["msg"]), result["msg"]
    assert result["processes"][0]["code"] == "wrong_build"
    assert_buggy(srv)
    assert control.list_patches(srv.pid)["patches"] == []


def test_the_rollout_playbook_of_the_docs(servers: ServerBuild, started: list[Server], tmp_path: Path) -> None:
    """docs/fleet.md's playbook, its paths pointed at this build: it rolls the patch out,
    and its ps --missing step fails the play when a process lacks the patch."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "fleet.md").read_text()
    block = doc.split("### A rolling rollout", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shipped = tmp_path / "shipped" / "fix_parse.so"
    shipped.parent.mkdir()
    playbook = tmp_path / "rollout.yml"
    playbook.write_text(block.replace("build/fix_parse.so", str(servers.patches["fix_parse"]))
                        .replace("/var/tmp/fix_parse.so", str(shipped))
                        .replace("state: installed", f"state: installed\n        patch_dir: {tmp_path / 'pd'}"))
    a, b = (start_server(servers.binary, "jump") for _ in range(2))
    started += [a, b]
    out = run_playbook(tmp_path / "a", playbook)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "failed=0" in out.stdout
    for srv in (a, b):
        assert [p["name"] for p in control.list_patches(srv.pid)["patches"]] == ["fix_parse"]
    # A process of that build that cannot be patched (its channel is off): the module fails
    # the task, and the play stops there - the verification step never runs.
    proc = subprocess.Popen([str(servers.binary), "0"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=clean_env(FENTRY_CONTROL="0"), cwd=tmp_path)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"listening on")
        stopped = run_playbook(tmp_path / "a", playbook)
        assert stopped.returncode != 0
        assert "failed=1" in stopped.stdout
        assert "1 of 3 processes refused" in stopped.stdout
        assert "Every server process of that build has it in effect" not in stopped.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
