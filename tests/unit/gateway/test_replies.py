"""The reply catalogue: RFC 3463 codes and no unsafe text."""

from __future__ import annotations

import re

from gateway.smtp import replies
from gateway.smtp.replies import Reply


def _all() -> list[Reply]:
    return [v for v in vars(replies).values() if isinstance(v, Reply)]


def test_every_reply_has_matching_enhanced_status() -> None:
    for reply in _all():
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.status), reply
        assert str(reply.code)[0] == reply.status[0], reply
        assert str(reply).startswith(f"{reply.code} {reply.status} ")


def test_catalogue_codes_from_style_guide() -> None:
    assert (replies.UNKNOWN_RECIPIENT.code, replies.UNKNOWN_RECIPIENT.status) == (550, "5.1.1")
    assert (replies.SENDER_REFUSED.code, replies.SENDER_REFUSED.status) == (550, "5.7.1")
    assert (replies.TOO_BIG.code, replies.TOO_BIG.status) == (552, "5.3.4")
    assert (replies.TEMPORARY_FAILURE.code, replies.TEMPORARY_FAILURE.status) == (451, "4.3.0")


def test_detail_is_one_ascii_line() -> None:
    line = replies.SENDER_REFUSED.with_detail("From naïve\r\n250 injected")
    assert "\r" not in line and "\n" not in line
    assert line.isascii()
