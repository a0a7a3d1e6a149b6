"""The SMTP reply catalogue: every reply the listener sends comes from here.

Each reply carries an RFC 5321 §4.2 code and an RFC 3463 enhanced status
code. Texts are fixed phrases; they never contain exception text, and the
only variable parts are an incident id or a refusal reason produced by the
pipeline (``Refusal.reason`` is written to be safe to send).

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """One SMTP reply.

    Attributes:
        code: three-digit reply code (RFC 5321 §4.2.3).
        status: enhanced status code ``class.subject.detail`` (RFC 3463).
        text: human-readable text, ASCII, one line.
    """

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def with_detail(self, detail: str) -> str:
        """Return the reply line with ``detail`` appended (ASCII-safe, one line)."""
        safe = detail.encode("ascii", "replace").decode("ascii")
        safe = " ".join(safe.split())[:300]
        return f"{self} ({safe})" if safe else str(self)


OK_SENDER = Reply(code=250, status="2.1.0", text="Sender OK")
OK_RECIPIENT = Reply(code=250, status="2.1.5", text="Recipient OK")
STORED = Reply(code=250, status="2.0.0", text="Message stored")
DUPLICATE = Reply(code=250, status="2.0.0", text="Message already stored")
QUARANTINED = Reply(code=250, status="2.0.0", text="Message kept for review")

UNKNOWN_RECIPIENT = Reply(code=550, status="5.1.1", text="No such sync address")
RELAY_DENIED = Reply(code=550, status="5.7.1", text="Relaying denied")
SENDER_REFUSED = Reply(code=550, status="5.7.1", text="Sender not allowed for this sync address")
TOO_BIG = Reply(code=552, status="5.3.4", text="Message too big")
LINE_TOO_LONG = Reply(code=500, status="5.5.2", text="Line too long")
STARTTLS_REQUIRED = Reply(code=530, status="5.7.0", text="Must issue a STARTTLS command first")
TOO_MANY_RECIPIENTS = Reply(code=452, status="4.5.3", text="Too many recipients")
TEMPORARY_FAILURE = Reply(code=451, status="4.3.0", text="Temporary failure, try again later")
SHUTTING_DOWN = Reply(code=421, status="4.3.2", text="Service shutting down")
