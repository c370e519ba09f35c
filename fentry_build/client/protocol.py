"""The control protocol's facts on the client side (docs/protocol.md describes it whole).

The shim's side is shim/control/protocol.c; the error codes are the list in
shim/core/codes.h.  tests/test_protocol_doc.py fails when this module and those headers
(or the document) disagree.
"""

from __future__ import annotations

from fentry_build.errors import FentryError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not imported at run time (fentry_build/record.py says why)
    from typing import Any

    Reply = dict[str, Any]

#: The version this client speaks; ``status`` reports the process's as "protocol"
#: (absent: version 1, before error codes, deadlines and history).
PROTOCOL_VERSION = 2

#: Every "code" an error reply may carry, in the order of shim/core/codes.h.
CODES = (
    "failed",
    "bad_request",
    "not_permitted",
    "timeout",
    "expired",
    "no_such_patch",
    "wrong_state",
    "busy",
    "bad_file",
    "bad_patch",
    "wrong_build",
    "entry_changed",
    "callback_refused",
)

#: Bytes of one request line, its newline not counted.
LINE_MAX = 65536
#: Connections a process serves at once; more wait in its listen backlog.
CLIENTS_MAX = 16
#: The default of FENTRY_CONTROL_REQUEST_SECONDS: the time a connection has for each
#: request line (from acceptance or its previous reply) and for reading each reply.
REQUEST_SECONDS = 10


class ProcessRefused(FentryError):
    """The process answered a request with ``"ok": false``: its ``code`` and one line."""

    def __init__(self, message: str, code: str, reply: Reply) -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply


def refusal_code(reply: Reply) -> str:
    """The code of an error reply; "failed" for a version-1 process that sends none."""
    code = reply.get("code")
    return code if isinstance(code, str) and code else "failed"


__all__ = ["PROTOCOL_VERSION", "CODES", "LINE_MAX", "CLIENTS_MAX", "REQUEST_SECONDS",
           "ProcessRefused", "refusal_code"]
