"""Running the Ansible collection of the repository (ansible/) with ansible-core, against
localhost over the local connection, the module's interpreter being this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.builds import TESTS

COLLECTIONS = TESTS.parent / "ansible"
MODULE = "fentry.live.fentry_patch"
BIN = Path(sys.executable).parent
TIMEOUT = 300.0  # a bound on one ansible run, not a speed requirement


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "FENTRY_"))}
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "LC_ALL": "C.UTF-8",
        # fentry-build of the package under test first (the module runs it on the "target").
        "PATH": os.pathsep.join([str(BIN), env.get("PATH", "/usr/bin:/bin")]),
    })
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(extra or {})
    return env


def inventory(home: Path) -> Path:
    inv = home / "inventory.ini"
    inv.write_text("[servers]\nlocalhost ansible_connection=local "
                   f"ansible_python_interpreter={sys.executable}\n")
    return inv


def run_module(home: Path, args: dict[str, Any], *, check: bool = False,
               diff: bool = False) -> tuple[int, dict[str, Any], str]:
    """`ansible localhost -m fentry.live.fentry_patch -a ARGS`: its exit status, the module's
    result (the tree callback's JSON) and what it printed."""
    home.mkdir(parents=True, exist_ok=True)
    tree = home / "tree"
    if (tree / "localhost").exists():
        (tree / "localhost").unlink()
    cmd = [str(BIN / "ansible"), "localhost", "-i", str(inventory(home)), "-m", MODULE,
           "-a", json.dumps(args), "-t", str(tree)]
    cmd += ["--check"] if check else []
    cmd += ["--diff"] if diff else []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(home), cwd=home)
    result = json.loads((tree / "localhost").read_text()) if (tree / "localhost").exists() else {}
    return proc.returncode, result, proc.stdout + proc.stderr


def run_playbook(home: Path, playbook: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    home.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory(home)), str(playbook), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(home), cwd=home)
