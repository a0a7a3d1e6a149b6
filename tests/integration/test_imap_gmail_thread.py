"""X-GM-THRID as a threading hint (R11), at the storage level (Dovecot offers no X-GM-EXT-1).

``load_facts`` given ``Lookups.x_gm_thrid`` returns the instances of every
synced thread already carrying that Gmail thread id, as ``ThreadFact``
rows whose ``message_id`` is ``GMAIL_THREAD_HINT``; SQLite in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from ingest.rules.threading import GMAIL_THREAD_HINT as RULE_HINT
from ingest.types import InstanceState, Lookups, RouteSettings, ThreadOrigin
from storage.db import Database
from storage.migrate import upgrade
from storage.models import SyncedThread, ThreadInstance
from storage.repos.directory import add_subaccount
from storage.repos.facts import GMAIL_THREAD_HINT, load_facts

pytestmark = pytest.mark.integration

THRID = 1_790_000_000_000_000_123
OTHER_THRID = 1_790_000_000_000_000_999


def lookups(x_gm_thrid: int | None) -> Lookups:
    return Lookups(
        address_keys=frozenset(),
        own_message_id=None,
        message_ids=frozenset(),
        identity_key="none",
        sync_addresses=frozenset(),
        x_gm_thrid=x_gm_thrid,
    )


def add_thread(session: Session, subaccount_id: int, x_gm_thrid: int) -> int:
    thread = SyncedThread(origin=ThreadOrigin.CRM, x_gm_thrid=x_gm_thrid)
    session.add(thread)
    session.flush()
    session.add(
        ThreadInstance(thread_id=thread.id, subaccount_id=subaccount_id, state=InstanceState.ACTIVE)
    )
    session.flush()
    return thread.id


async def test_r11_load_facts_finds_threads_by_gmail_thread_id(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    try:

        def check(session: Session) -> None:
            sub = add_subaccount(session, "acme")
            wanted = add_thread(session, sub, THRID)
            add_thread(session, sub, OTHER_THRID)
            facts = load_facts(
                session, lookups(THRID), aliases={}, settings=RouteSettings(), auth=None
            )
            assert [(f.message_id, f.thread_id, f.subaccount_id) for f in facts.threads] == [
                (GMAIL_THREAD_HINT, wanted, sub)
            ]
            assert facts.threads[0].origin is ThreadOrigin.CRM
            none = load_facts(
                session, lookups(None), aliases={}, settings=RouteSettings(), auth=None
            )
            assert none.threads == ()

        await db.run(check)
    finally:
        await db.close()


def test_r11_storage_and_rule_agree_on_the_hint_marker() -> None:
    assert GMAIL_THREAD_HINT == RULE_HINT
