"""Crash test: SIGKILL the server mid-stream; every 250'd message survives exactly once.

Several concurrent aiosmtplib clients send 200 messages; the server is
killed with SIGKILL while they run. After a restart (which processes the
spool), each message that received a 250 appears exactly once in its
conversation (BEHAVIOUR.md "Never acknowledge … a message that is not
durably stored"; R12 makes re-processing harmless).
"""

from __future__ import annotations

import asyncio
import email.policy
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
import pytest

from tests.integration.conftest import Gateway, Tenant

pytestmark = pytest.mark.integration

MESSAGE_COUNT = 200
CLIENT_COUNT = 8
KILL_AFTER_ACKS = 60


def _message(tenant: Tenant, index: int) -> tuple[str, bytes]:
    msg = EmailMessage()
    msg["From"] = tenant.user_email
    msg["To"] = "crash-contact@example.com"
    msg["Subject"] = f"crash {index}"
    message_id = make_msgid(idstring=f"crash{index}", domain="it.example.org")
    msg["Message-ID"] = message_id
    msg.set_content(f"message {index}\n" + "x" * 2000)
    return message_id.strip("<>"), msg.as_bytes(policy=email.policy.SMTP)


async def test_sigkill_mid_stream_loses_no_acknowledged_message(
    gateway: Gateway, tenant: Tenant
) -> None:
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for index in range(MESSAGE_COUNT):
        queue.put_nowait(_message(tenant, index))
    acked: list[str] = []
    killed = asyncio.Event()
    enough = asyncio.Event()

    async def client() -> None:
        while not queue.empty() and not killed.is_set():
            message_id, raw = queue.get_nowait()
            try:
                await aiosmtplib.send(
                    raw,
                    sender=tenant.user_email,
                    recipients=[tenant.sync_address],
                    hostname="127.0.0.1",
                    port=gateway.smtp_port,
                    timeout=20,
                )
            except (aiosmtplib.SMTPException, OSError):
                continue  # not acknowledged: may or may not be stored
            acked.append(message_id)
            if len(acked) >= KILL_AFTER_ACKS:
                enough.set()

    async def killer() -> None:
        await enough.wait()
        await asyncio.to_thread(gateway.kill)
        killed.set()

    await asyncio.gather(killer(), *(client() for _ in range(CLIENT_COUNT)))
    await asyncio.to_thread(gateway.start)
    view = gateway.cli(
        "conversation", "show", "crash-contact@example.com", "--subaccount", tenant.subaccount
    )
    stored = [m["message_id"] for m in view["messages"]]
    assert len(stored) == len(set(stored)), "a message was stored twice"
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged messages lost"
    assert len(acked) >= KILL_AFTER_ACKS
