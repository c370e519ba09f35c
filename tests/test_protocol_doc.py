"""The control protocol is written once: the shim's headers, the client's protocol module and
docs/protocol.md must agree (error codes, version, limits, ops).  Fails when one drifts."""

from __future__ import annotations

import re
from pathlib import Path

from fentry_build import paths
from fentry_build.client import protocol

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _shim(rel: str) -> str:
    return (paths.shim_dir() / rel).read_text()


def _define(text: str, name: str) -> int:
    found = re.search(rf"^#define {name} (\d+)", text, re.MULTILINE)
    assert found, f"#define {name} not found"
    return int(found.group(1))


def test_the_error_codes_are_the_shims_list() -> None:
    names = re.findall(r'^\s*X\(\w+, "(\w+)"\)', _shim("core/codes.h"), re.MULTILINE)
    assert tuple(names) == protocol.CODES


def test_the_version_and_limits_are_the_shims() -> None:
    assert _define(_shim("control/protocol.h"), "FENTRY_PROTOCOL_VERSION") == protocol.PROTOCOL_VERSION
    assert _define(_shim("control/protocol.h"), "FENTRY_LINE_MAX") == protocol.LINE_MAX
    control_c = _shim("control/control.c")
    assert _define(control_c, "CTL_MAX_CLIENTS") == protocol.CLIENTS_MAX
    assert _define(control_c, "CTL_REQUEST_SECONDS") == protocol.REQUEST_SECONDS


def test_the_document_describes_every_code_op_and_limit() -> None:
    doc = DOC.read_text()
    documented = re.findall(r"^\| `(\w+)` \|", doc.split("## Errors", 1)[1], re.MULTILINE)
    assert tuple(documented) == protocol.CODES
    ops_c = re.search(r'#define OPS "([^"]+)"', _shim("control/protocol.c"))
    assert ops_c
    ops = ops_c.group(1).split(", ")
    assert re.findall(r"^### (\w+)$", doc, re.MULTILINE) == ops
    assert f"**Version {protocol.PROTOCOL_VERSION}.**" in doc
    assert f'"protocol": {protocol.PROTOCOL_VERSION}' in doc
    assert f"**{protocol.LINE_MAX:,} bytes**" in doc
    assert f"**{protocol.CLIENTS_MAX} connections**" in doc
    assert f"default **{protocol.REQUEST_SECONDS}**" in doc
