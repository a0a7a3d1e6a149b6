"""Pure parsers on recorded server transcripts (Dovecot 2.3.19 via aioimaplib 2.0.3).

Each transcript is the bytes the server sent, fed through aioimaplib's own
protocol object (no socket), so the lines are exactly what the session
hands to ``gateway.imap.responses``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aioimaplib import aioimaplib  # type: ignore[import-untyped]

from gateway.imap.responses import (
    ResponseError,
    find_folder,
    has_exists,
    is_auth_failure,
    is_bye,
    parse_fetch,
    parse_list,
    parse_search,
    parse_select,
)

SELECT_TRANSCRIPT = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]"
    b" Flags permitted.\r\n"
    b"* 3 EXISTS\r\n* 0 RECENT\r\n"
    b"* OK [UIDVALIDITY 1796032633] UIDs valid\r\n"
    b"* OK [UIDNEXT 4] Predicted next UID\r\n"
    b"A1 OK [READ-WRITE] Select completed (0.002 + 0.000 + 0.001 secs).\r\n"
)

GMAIL_LIST = (
    b'* LIST (\\Noselect \\HasChildren) "/" [Gmail]\r\n'
    b'* LIST (\\HasNoChildren \\Junk) "/" [Gmail]/Spam\r\n'
    b'* LIST (\\HasNoChildren \\Trash) "/" [Gmail]/Trash\r\n'
    b'* LIST (\\HasNoChildren \\Drafts) "/" [Gmail]/Drafts\r\n'
    b'* LIST (\\HasNoChildren \\Sent) "/" "[Gmail]/Sent Mail"\r\n'
    b'* LIST (\\HasNoChildren \\All) "/" "[Gmail]/All Mail"\r\n'
    b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
    b"A1 OK List completed (0.001 + 0.000 secs).\r\n"
)

OUTLOOK_LIST = (
    b'* LIST (\\HasNoChildren \\Sent) "/" "Sent Items"\r\n'
    b'* LIST (\\HasNoChildren \\Trash) "/" "Deleted Items"\r\n'
    b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"\r\n'
    b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
    b"A1 OK List completed.\r\n"
)

BODY = b"From: contact@customer.test\r\nSubject: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n"
FETCH_TRANSCRIPT = (
    b'* 1 FETCH (UID 7 INTERNALDATE "30-Nov-2026 10:58:41 +0100" BODY[] {%d}\r\n' % len(BODY)
    + BODY
    + b")\r\n* 2 FETCH (FLAGS (\\Seen))\r\n"
    + b"* 2 FETCH (UID 9 X-GM-MSGID 1278455344230334865 X-GM-THRID 1266894439832287888"
    + b' INTERNALDATE "30-Nov-2026 09:59:00 +0000" BODY[] {%d}\r\n' % len(BODY)
    + BODY
    + b")\r\nA1 OK Fetch completed (0.001 + 0.000 secs).\r\n"
)


async def replay(name: str, transcript: bytes, command: type = aioimaplib.Command) -> list:
    """Feed ``transcript`` to aioimaplib's protocol for a pending ``name`` command."""
    loop = asyncio.get_running_loop()
    protocol = aioimaplib.IMAP4ClientProtocol(loop)
    protocol.state = aioimaplib.SELECTED
    if command is aioimaplib.FetchCommand:
        pending = command("A1", "1:*", "(UID)", prefix="UID", loop=loop)
    else:
        pending = command(name, "A1", loop=loop)
    if name in ("SELECT",):
        protocol.pending_sync_command = pending
    else:
        protocol.pending_async_commands[pending.untagged_resp_name] = pending
    protocol.data_received(transcript)
    await pending.wait()
    return list(pending.response.lines)


async def test_parse_select_reads_uidvalidity_uidnext_exists() -> None:
    info = parse_select(await replay("SELECT", SELECT_TRANSCRIPT))
    assert (info.uidvalidity, info.uidnext, info.exists) == (1796032633, 4, 3)
    assert info.highestmodseq is None


def test_parse_select_without_uidvalidity_is_an_error() -> None:
    with pytest.raises(ResponseError):
        parse_select([b"3 EXISTS", b"Select completed"])


async def test_rfc6154_gmail_sent_found_by_special_use_flag() -> None:
    folders = parse_list(await replay("LIST", GMAIL_LIST))
    assert len(folders) == 7
    sent = find_folder(folders, "sent", ("Sent",))
    assert sent is not None and sent.name == "[Gmail]/Sent Mail"
    inbox = find_folder(folders, "inbox", ())
    assert inbox is not None and inbox.wire_name == "INBOX"


async def test_rfc6154_outlook_sent_and_modified_utf7_names() -> None:
    folders = parse_list(await replay("LIST", OUTLOOK_LIST))
    assert find_folder(folders, "sent", ()) == folders[0]
    assert folders[2].name == "Entwürfe" and folders[2].wire_name == "Entw&APw-rfe"


def test_provider_default_name_used_without_flag() -> None:
    folders = parse_list([b'(\\HasNoChildren) "/" "Sent Items"', b"List completed"])
    found = find_folder(folders, "sent", ("Sent Items",))
    assert found is not None and found.name == "Sent Items"
    assert find_folder(folders, "sent", ("Sent",)) is None


async def test_parse_fetch_literals_dates_gmail_ids_and_drops_flag_updates() -> None:
    lines = await replay("FETCH", FETCH_TRANSCRIPT, aioimaplib.FetchCommand)
    messages = parse_fetch(lines)
    assert [m.uid for m in messages] == [7, 9]
    assert all(m.raw == BODY for m in messages)
    assert messages[0].internal_date == datetime(2026, 11, 30, 9, 58, 41, tzinfo=UTC)
    assert messages[0].x_gm_msgid is None
    assert (messages[1].x_gm_msgid, messages[1].x_gm_thrid) == (
        1278455344230334865,
        1266894439832287888,
    )


def test_parse_search_with_and_without_name() -> None:
    assert parse_search([b"3 1 2", b"Search completed"]) == (1, 2, 3)
    assert parse_search([b"SEARCH 5", b"Search completed"]) == (5,)
    assert parse_search([b"", b"Search completed"]) == ()


def test_untagged_predicates() -> None:
    assert has_exists([b"1 RECENT", b"12 EXISTS"])
    assert not has_exists([b"OK Still here"])
    assert is_bye(b"BYE Server shutting down.")
    assert is_auth_failure([b"[AUTHENTICATIONFAILED] Authentication failed."])
