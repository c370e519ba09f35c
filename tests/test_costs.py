"""The runtime says what things cost (issue 18 §3): status --json and list --json report the
duration of the last apply/revert/unload and of start-up's site preparation, the sites
written, and the memory the runtime holds.  Real server, real CLI, both modes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.builds import ServerBuild
from support.cli import cli
from support.servers import MODES, Server, assert_fixed, start_server


def ok(*args: str) -> dict[str, Any]:
    out = cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


@pytest.mark.parametrize("mode", MODES)
def test_status_and_list_report_durations_sites_and_memory(
        built: ServerBuild, started: list[Server], mode: str) -> None:
    srv = start_server(built.binary, mode)
    started.append(srv)
    pid, fix = str(srv.pid), built.patches["fix_parse"]
    costs = ok("status", "--pid", pid)["costs"]
    assert costs["last_apply"] is None and costs["last_unload"] is None
    if mode == "jump":
        assert costs["startup"]["seconds"] > 0
    else:
        assert costs["startup"] == {"seconds": 0.0, "sites_written": 0}  # nothing readied
    before = costs["sites_written"]

    ok("apply", "--pid", pid, str(fix))
    assert_fixed(srv)
    costs = ok("status", "--pid", pid)["costs"]
    last = costs["last_apply"]
    assert (last["name"], last["ok"]) == ("fix_parse", True) and last["seconds"] > 0
    (patch,) = ok("list", "--pid", pid)["patches"]
    assert patch["apply_seconds"] > 0 and patch["copy_bytes"] == fix.stat().st_size
    assert patch["mapped_bytes"] >= patch["copy_bytes"] // 2
    mem = costs["memory"]
    assert mem["patch_copies"] == fix.stat().st_size
    assert mem["patch_mappings"] == patch["mapped_bytes"]
    assert mem["tables"] > 0  # jump mode keeps its redirects in the table too
    status = ok("status", "--pid", pid)
    if mode == "jump":
        assert costs["sites_written"] > before and costs["batches"] >= 1
        # Loaded near the program and placed by the generator: every site jumps straight
        # to its replacement, no trampoline in between.
        assert patch["near"] is True and status["far_reason"] is None
        assert costs["sites_direct"] == len(patch["functions"]) and costs["trampolines"] == 0
    else:
        assert costs["sites_written"] == 0 and costs["trampolines"] == 0
        assert costs["sites_direct"] == 0 and patch["near"] is False
        assert status["far_reason"].startswith("dispatch mode")

    ok("revert", "--pid", pid, "fix_parse")
    ok("unload", "--pid", pid, "fix_parse")
    costs = ok("status", "--pid", pid)["costs"]
    assert costs["last_revert"]["name"] == "fix_parse" and costs["last_revert"]["ok"] is True
    assert costs["last_unload"]["ok"] is True and costs["last_unload"]["seconds"] > 0
    assert costs["memory"]["patch_copies"] == 0 and costs["memory"]["patch_mappings"] == 0
    refused = cli("revert", "--pid", pid, "fix_parse")
    assert refused.returncode != 0
    costs = ok("status", "--pid", pid)["costs"]
    assert costs["last_revert"]["ok"] is False  # refused operations count too

    text = cli("status", "--pid", pid).stdout
    assert "apply:     " in text and "(fix_parse, done, " in text
    assert "memory:    tables " in text and "patch copies 0 KiB" in text
