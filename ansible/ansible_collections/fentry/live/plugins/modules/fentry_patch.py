#!/usr/bin/python
# fentry_patch - an Ansible module: a live patch applied to, or reverted from, the running
# processes of a host, or installed for the processes it starts later (fentry_build).
# It drives the fentry-build command on the target (its --json output).
from __future__ import annotations

DOCUMENTATION = r"""
---
module: fentry_patch
short_description: Live-patch the running processes of a host with fentry_build
description:
  - Applies a fentry_build live patch (a patch C(.so) built with C(meson compile patches))
    to every running process of the build it is for, reverts it, or installs it into the
    patch directory (C(fentry-build install)) for the processes started later, by running
    C(fentry-build) on the target and reading its JSON output.
  - Idempotent - a process that has this version of the patch active already is left
    alone, a patch that is not applied is not reverted again, and an installed file with
    the same contents is not rewritten; a second run reports C(changed=false).
  - Fails when any process refuses, and lists every process's result.
  - Supports check mode (C(fentry-build --dry-run)) and diff mode.
requirements:
  - The fentry_build Python package on the target (C(pip install fentry_build)), which gives
    the C(fentry-build) command; Linux x86-64.
options:
  src:
    description:
      - Path of the patch C(.so) on the target (copy it there first, e.g. with M(ansible.builtin.copy)).
      - Its name (the file name without C(.so)) is the patch's name in the processes.
    type: path
    required: true
  state:
    description:
      - C(present) - applied to every running process of the patch's build (or of O(program)
        / O(build_id)).
      - C(absent) - reverted in those processes, and removed from the patch directory.
      - C(installed) - in the patch directory (C(fentry-build install), for the processes of
        that build started later) and applied to every running process of that build.
    type: str
    choices: [present, absent, installed]
    default: present
  program:
    description: Only the processes running this executable (a path on the target).
    type: path
  build_id:
    description: Only the processes running this build (hex build-id, as C(fentry-build ps) shows).
    type: str
  patch_dir:
    description:
      - The patch directory (sets C(FENTRY_PATCH_DIR) for the command). Default - the
        command's rule, C(/var/lib/fentry) for root, else C(~/.local/share/fentry).
      - The processes must use the same directory (the same variable in their environment).
    type: path
  timeout:
    description: Seconds each process has to answer (default - the command's, 60 for apply).
    type: float
  executable:
    description:
      - The C(fentry-build) command. Default - C(fentry-build) on the PATH, else
        C(python -m fentry_build) with the module's interpreter.
    type: path
author:
  - fentry_build contributors
"""

EXAMPLES = r"""
- name: Ship the fix
  ansible.builtin.copy:
    src: build/fix_parse.so
    dest: /var/tmp/fix_parse.so
    mode: "0644"

- name: Apply it to every running server of that build
  fentry.live.fentry_patch:
    src: /var/tmp/fix_parse.so
    state: present

- name: Also for servers started from now on
  fentry.live.fentry_patch:
    src: /var/tmp/fix_parse.so
    state: installed

- name: Take it back everywhere
  fentry.live.fentry_patch:
    src: /var/tmp/fix_parse.so
    state: absent
    program: /usr/sbin/server
"""

RETURN = r"""
processes:
  description: One result per process, as C(fentry-build --json) prints it.
  returned: always
  type: list
  elements: dict
  sample:
    - {"pid": 1234, "ok": true, "changed": true, "name": "fix_parse", "sha256": "9f86d0...", "functions": 1}
    - {"pid": 1240, "ok": false, "code": "wrong_build", "error": "apply fix_parse.so to pid 1240: ..."}
installed:
  description: With state=installed, where the patch is and whether it was written.
  returned: when state is installed
  type: dict
  sample: {"path": "/var/lib/fentry/1f2e.../fix_parse.so", "changed": false, "sha256": "9f86d0..."}
removed:
  description: With state=absent, the files removed from the patch directory.
  returned: when state is absent
  type: list
  elements: dict
failed_pids:
  description: The processes that refused.
  returned: always
  type: list
  elements: int
"""

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

NOTHING_MATCHED = "no running process"  # the command's words when --all finds no process


def _command(module):
    """fentry-build: the option, else on the PATH, else this interpreter's fentry_build."""
    if module.params["executable"]:
        return [module.params["executable"]]
    found = shutil.which("fentry-build") or module.get_bin_path("fentry-build")
    return [found] if found else [sys.executable, "-m", "fentry_build"]


class Runner:
    """fentry-build on the target: its JSON lines, and its one-line error."""

    def __init__(self, module):
        self.module = module
        self.base = _command(module)
        self.env = {}
        if module.params["patch_dir"]:
            self.env["FENTRY_PATCH_DIR"] = module.params["patch_dir"]

    def run(self, *args):
        p = self.module.params
        argv = [*self.base, *args, "--json"]
        if p["timeout"]:
            argv += ["--timeout", str(p["timeout"])]
        if self.module.check_mode:
            argv.append("--dry-run")
        rc, out, err = self.module.run_command(argv, environ_update=self.env)
        try:
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        except ValueError:
            self.module.fail_json(msg=f"fentry-build printed something that is not JSON: {out[:500]}",
                                  rc=rc, stdout=out, stderr=err, cmd=argv)
        return rc, lines, err.strip().removeprefix("fentry-build: error: "), argv

    def selection(self):
        p = self.module.params
        sel = ["--all"]
        if p["program"]:
            sel += ["--program", p["program"]]
        if p["build_id"]:
            sel += ["--build-id", p["build_id"]]
        return sel


class Result:
    """What the module returns: every process's line, the diff, what failed."""

    def __init__(self):
        self.data = {"changed": False, "processes": [], "failed_pids": []}
        self.before, self.after, self.warnings = [], [], []

    def processes(self, lines, applied_after):
        """Per-process lines of apply (applied_after) or revert."""
        for line in lines:
            self.data["processes"].append(line)
            if not line.get("ok"):
                self.data["failed_pids"].append(line["pid"])
                continue
            changed = bool(line.get("changed"))
            self.data["changed"] = self.data["changed"] or changed
            was = applied_after != changed  # applied before unless this run changes that
            self.before.append(f"pid {line['pid']}: {'applied' if was else 'not applied'}")
            self.after.append(f"pid {line['pid']}: {'applied' if applied_after else 'not applied'}")

    def file(self, path, before, after, changed):
        self.data["changed"] = self.data["changed"] or changed
        self.before.append(f"{path}: {before}")
        self.after.append(f"{path}: {after}")

    def finish(self, module):
        self.data["diff"] = {"before": "".join(x + "\n" for x in self.before),
                             "after": "".join(x + "\n" for x in self.after)}
        for text in self.warnings:
            module.warn(text)
        if self.data["failed_pids"]:
            first = next(line for line in self.data["processes"] if not line.get("ok"))
            module.fail_json(msg=f"{len(self.data['failed_pids'])} of {len(self.data['processes'])} "
                                 f"processes refused; pid {first['pid']}: {first.get('error')}",
                             **self.data)
        module.exit_json(**self.data)


def _processes_step(module, runner, result, args, applied_after):
    """apply or revert over the chosen processes."""
    rc, lines, err, argv = runner.run(*args)
    lines = [line for line in lines if "pid" in line]
    if rc != 0 and not lines:
        if NOTHING_MATCHED in err:
            result.warnings.append(err)  # no process of that build on this host: nothing to do
            return
        module.fail_json(msg=err or f"fentry-build {args[0]} failed (exit {rc})", rc=rc, cmd=argv,
                         **result.data)
    result.processes(lines, applied_after)


def _installed(module, runner, result, src):
    rc, lines, err, argv = runner.run("install", src, "--apply")
    done = next((line for line in lines if line.get("op") == "install"), None)
    if done is None:
        module.fail_json(msg=err or f"fentry-build install failed (exit {rc})", rc=rc, cmd=argv)
    result.data["installed"] = done
    result.file(done["path"], done.get("previous") or ("absent" if done["changed"] else done["sha256"]),
                done["sha256"], bool(done["changed"]))
    result.processes([line for line in lines if "pid" in line], True)


def _absent(module, runner, result, src, name):
    p = module.params
    # Without program/build_id, the patch file names the build whose processes to ask.
    target = name if (p["program"] or p["build_id"]) else src
    _processes_step(module, runner, result, ["revert", *runner.selection(), target, "--if-applied"], False)
    build = ["--build-id", p["build_id"]] if p["build_id"] else []
    rc, lines, err, argv = runner.run("uninstall", name, "--if-installed", *build)
    if rc != 0 or not lines:
        module.fail_json(msg=err or f"fentry-build uninstall failed (exit {rc})", rc=rc, cmd=argv,
                         **result.data)
    result.data["removed"] = lines[0].get("removed", [])
    for r in result.data["removed"]:
        result.file(r["path"], r.get("sha256"), "absent", True)


def main():
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent", "installed"]},
            "program": {"type": "path"},
            "build_id": {"type": "str"},
            "patch_dir": {"type": "path"},
            "timeout": {"type": "float"},
            "executable": {"type": "path"},
        },
        supports_check_mode=True,
    )
    src = module.params["src"]
    if not os.path.isfile(src):
        module.fail_json(msg=f"src {src} is not a file on the target: copy the patch there first")
    name = os.path.basename(src).removesuffix(".so")
    runner, result = Runner(module), Result()
    state = module.params["state"]
    if state == "installed":
        _installed(module, runner, result, src)
    elif state == "present":
        _processes_step(module, runner, result, ["apply", *runner.selection(), src], True)
    else:
        _absent(module, runner, result, src, name)
    result.finish(module)


if __name__ == "__main__":
    main()
