"""conversation_view, list_sync_log, quarantine and migrations on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session

from ingest.types import (
    Direction,
    ImapOrigin,
    LogEntry,
    MailboxId,
    MailboxState,
    Outcome,
    Provider,
    RawMessage,
    Source,
    Uid,
    UidValidity,
)
from storage.blobs import BlobStore
from storage.db import Database
from storage.errors import NotFound
from storage.migrate import head_revision, schema_status
from storage.models import Base, Contact, Mailbox, QuarantineEntry, SyncLogEntry
from storage.repos.conversations import AddressView, AttachmentView
from storage.repos.directory import add_contact, add_subaccount, add_user
from storage.repos.messages import apply_decision, conversation_view
from storage.repos.quarantine import QUARANTINE_RULE, quarantine_message
from storage.repos.sync_log import list_sync_log

from .storage_builders import T0, addr, attachment, decision, prepared, to_contact


async def test_conversation_view_oldest_first_with_participants_and_attachments(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        add_user(session, "ann@example.org", "Ann", [a])
        bob = add_contact(
            session, a, "bob@example.com", name="Bob", assigned_user_email="ann@example.org"
        )
        ann_addr, bob_addr = addr("ann@example.org", "Ann"), addr("bob@example.com", "Bob")
        later = prepared("later@x", from_=bob_addr, to=[ann_addr], date_at=T0 + timedelta(hours=1))
        earlier = prepared(
            "earlier@x",
            from_=ann_addr,
            to=[bob_addr],
            cc=[addr("c@example.com")],
            attachments=[attachment(b"hello", "h.txt")],
            date_at=T0,
        )
        undated = prepared("undated@x", from_=bob_addr, date_at=None)
        for prep, direction in (
            (later, Direction.INBOUND),
            (earlier, Direction.OUTBOUND),
            (undated, Direction.INBOUND),
        ):
            apply_decision(
                session,
                decision(
                    prep,
                    conversations=[to_contact(a, bob)],
                    direction=direction,
                    source=Source.MAILBOX,
                ),
                blobs,
            )
        view = conversation_view(session, a, "BOB@example.com")
        assert (view.contact.id, view.contact.name, view.contact.assigned_user_email) == (
            bob,
            "Bob",
            "ann@example.org",
        )
        # Dated messages by Date; the undated one by its stored time (now, after 2026-03-01).
        assert [m.message_id for m in view.messages] == ["earlier@x", "later@x", "undated@x"]
        first = view.messages[0]
        assert first.direction is Direction.OUTBOUND and first.source is Source.MAILBOX
        assert first.from_ == (AddressView(name="Ann", address="ann@example.org"),)
        assert first.to == (AddressView(name="Bob", address="bob@example.com"),)
        assert first.cc == (AddressView(name="", address="c@example.com"),)
        assert first.bcc == ()
        assert first.attachments == (
            AttachmentView(
                name="h.txt",
                content_type="text/plain",
                size_bytes=5,
                sha256=first.attachments[0].sha256,
            ),
        )
        assert blobs.get(first.attachments[0].sha256) == b"hello"
        assert first.date == T0

    await db.run(check)


async def test_r10_conversation_view_shows_assigned_duplicate_contact(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        ann = add_user(session, "ann@example.org", "Ann", [a])
        first = add_contact(session, a, "bob@example.com")
        # An imported duplicate (R10), inserted as an import of old data would be.
        dup = Contact(
            subaccount_id=a,
            email="Bob@example.com",
            address_key="bob@example.com",
            name="Bob (sales)",
            assigned_user_id=None,
        )
        session.add(dup)
        session.flush()
        view = conversation_view(session, a, "bob@example.com")
        assert view.contact.id == dup.id  # both unassigned: the most recently updated
        session.execute(sa.update(Contact).where(Contact.id == first).values(assigned_user_id=ann))
        view = conversation_view(session, a, "bob@example.com")
        assert view.contact.id == first  # an assigned contact comes first
        with pytest.raises(NotFound):
            conversation_view(session, a, "nobody@example.com")

    await db.run(check)


async def test_list_sync_log_newest_last_with_filters(db: Database, blobs: BlobStore) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        ann = add_user(session, "ann@example.org", "Ann", [a])
        mailbox = Mailbox(
            user_id=ann,
            subaccount_id=a,
            provider=Provider.IMAP,
            address="ann@example.org",
            address_key="ann@example.org",
            state=MailboxState.CONNECTED,
        )
        session.add(mailbox)
        session.flush()
        origin = ImapOrigin(
            mailbox_id=MailboxId(mailbox.id),
            folder="INBOX",
            folder_role="inbox",
            uidvalidity=UidValidity(1),
            uid=Uid(1),
        )
        for i in range(3):
            entry = LogEntry(rule="R2", reason=f"skip {i}", outcome=Outcome.SKIPPED)
            apply_decision(session, decision(prepared(f"s{i}@x"), log=[entry]), blobs)
        apply_decision(
            session,
            decision(
                prepared("imap@x", provenance=origin),
                log=[LogEntry(rule="R3", reason="mailbox thread", outcome=Outcome.SKIPPED)],
                source=Source.MAILBOX,
            ),
            blobs,
        )
        rows = list_sync_log(session)
        assert [r.reason for r in rows] == ["skip 0", "skip 1", "skip 2", "mailbox thread"]
        assert [r.reason for r in list_sync_log(session, limit=2)] == ["skip 2", "mailbox thread"]
        only = list_sync_log(session, mailbox_id=mailbox.id)
        assert [(r.rule, r.mailbox_id, r.source) for r in only] == [
            ("R3", mailbox.id, Source.MAILBOX)
        ]
        assert list_sync_log(session, since=T0 + timedelta(seconds=1)) == []
        assert all(r.at == T0 for r in rows)

    await db.run(check)


async def test_never_quarantine_keeps_raw_bytes_provenance_and_logs(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        prep = prepared("boom@x")
        raw = RawMessage(raw=b"\xff\xfe not mail", provenance=prep.raw.provenance, sha256="")
        qid = quarantine_message(session, raw, "ValueError", "Traceback ...", blobs)
        row = session.get_one(QuarantineEntry, qid)
        assert blobs.get(row.raw_sha256) == raw.raw
        assert row.provenance["kind"] == "smtp"
        assert row.provenance["envelope_recipients"] == list(
            prep.raw.provenance.envelope_recipients
        )  # type: ignore[union-attr]
        log = session.scalar(sa.select(SyncLogEntry))
        assert log is not None
        assert (log.rule, log.outcome, log.raw_sha256, log.source) == (
            QUARANTINE_RULE,
            Outcome.QUARANTINED,
            row.raw_sha256,
            Source.BCC,
        )

    await db.run(check)


async def test_migrations_match_models_and_reach_head(db: Database) -> None:
    def diffs(session: Session) -> list[object]:
        context = MigrationContext.configure(session.connection(), opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    assert await db.read(diffs) == []
    assert await schema_status(db) == (head_revision(), head_revision())
