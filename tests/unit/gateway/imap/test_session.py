"""The session's two aioimaplib workarounds, on recorded server bytes (no socket)."""

from __future__ import annotations

import asyncio

from aioimaplib import aioimaplib  # type: ignore[import-untyped]

from gateway.imap.session import _Protocol

XOAUTH2_ERROR_CHALLENGE = (
    b"+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=\r\n"
)
"""Dovecot's (and Gmail's) SASL error challenge for a rejected XOAUTH2 token."""


class Transport:
    """Records what the protocol writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


async def test_r22_rejected_xoauth2_token_gets_no_instead_of_hanging() -> None:
    protocol = _Protocol(asyncio.get_running_loop())
    protocol.state = aioimaplib.NONAUTH
    protocol.transport = Transport()
    pending = aioimaplib.Command("AUTHENTICATE", "A1", "XOAUTH2", "x", loop=protocol.loop)
    protocol.pending_sync_command = pending
    protocol.data_received(XOAUTH2_ERROR_CHALLENGE)
    assert protocol.transport.written == [b"\r\n"]  # the empty SASL response
    protocol.data_received(b"A1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
    await asyncio.wait_for(pending.wait(), 1.0)
    assert pending.response.result == "NO"


async def test_untagged_bye_during_idle_ends_the_connection() -> None:
    protocol = _Protocol(asyncio.get_running_loop())
    protocol.state = aioimaplib.SELECTED
    protocol.transport = Transport()
    idle = aioimaplib.IdleCommand("A2", protocol.idle_queue, loop=protocol.loop)
    protocol.pending_sync_command = idle
    protocol.data_received(b"+ idling\r\n")
    assert not protocol.ended.is_set()
    protocol.data_received(b"* BYE Server shutting down.\r\n")
    assert protocol.ended.is_set()


async def test_exists_seen_outside_idle_is_remembered() -> None:
    protocol = _Protocol(asyncio.get_running_loop())
    protocol.state = aioimaplib.SELECTED
    protocol.transport = Transport()
    protocol.data_received(b"* 4 EXISTS\r\n")
    assert protocol.exists_seen
