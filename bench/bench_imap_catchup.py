"""Benchmark (c) of issue 4 item 8: catch-up throughput after an outage.

Run through ``bench/bench_imap.py --catchup N`` (see its docstring). Prints
figures; asserts nothing about time.

Messages: every message of the open corpus (``threads/*.mbox``,
``mime/**/*.mbox*``, ``mime/**/*.eml``; located like
``tests/unit/ingest/conftest.py`` does), cycled until N; copies after the
first pass get a fresh Message-ID so that R12 does not shortcut them as
duplicates. Their ``From`` addresses become contacts assigned to the
mailbox's user (R2: Gmail, contact-initiated), so most messages are
stored; the rest are skipped by routing, still with a sync-log row.
"""

from __future__ import annotations

import asyncio
import mailbox
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from email.parser import BytesHeaderParser
from email.utils import getaddresses, make_msgid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet

from gateway.config import make_settings
from gateway.imap.session import FETCH_CHUNK
from gateway.imap.supervisor import ImapSupervisor, contact_initiated_of
from gateway.imap.watcher import WatcherState
from gateway.intake import Intake, raw_message
from gateway.mailboxes import MailboxService
from gateway.observability import Metrics
from gateway.spool import Spool
from ingest.pipeline import prepare
from ingest.types import ImapOrigin, MailboxId, Uid, UidValidity
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.repos.directory import add_contact
from tests.testbed.dovecot import Dovecot
from tests.testbed.tokens import TokenKeys
from tests.unit.ingest.conftest import corpus_missing_message, corpus_root, mbox_paths

ADDRESS = "catchup@example.test"
MAX_CONTACTS = 2000
APPEND_THREADS = 2
_MESSAGE_ID = re.compile(rb"^message-id:[^\n]*\n(?:[ \t][^\n]*\n)*", re.IGNORECASE | re.MULTILINE)


def gmail_settings(dovecot: Dovecot) -> Any:
    """Gateway settings whose Gmail provider is the testbed Dovecot (implicit TLS, its CA),
    with a fresh token key; shared by bench_imap.py's (a)/(b) and (c)."""
    gmail = {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.ports.imaps,
        "imap_security": "tls",
        "ca_file": str(dovecot.ca_file),
    }
    return make_settings(
        security={"token_key": Fernet.generate_key().decode()}, providers={"gmail": gmail}
    )


def corpus_messages() -> list[bytes]:
    """Every open corpus message's raw bytes (CRLF-normalised later by the server)."""
    missing = corpus_missing_message()
    if missing:
        raise SystemExit(missing)
    root = corpus_root()
    out: list[bytes] = []
    for path in mbox_paths(root):
        box = mailbox.mbox(str(path), create=False)
        try:
            out.extend(box.get_bytes(key) for key in box.iterkeys())
        finally:
            box.close()
    out.extend(p.read_bytes() for p in sorted((root / "mime").rglob("*.eml")))
    return [m for m in out if m.strip()]


def with_fresh_id(raw: bytes) -> bytes:
    """``raw`` with its Message-ID header replaced by a new one."""
    header = f"Message-ID: {make_msgid(domain='catchup.bench')}\n".encode()
    stripped = _MESSAGE_ID.sub(b"", raw, count=1)
    return header + stripped


def take(messages: list[bytes], n: int) -> Iterator[bytes]:
    """The first ``n`` of ``messages`` cycled; later passes with fresh Message-IDs."""
    for i in range(n):
        raw = messages[i % len(messages)]
        yield raw if i < len(messages) else with_fresh_id(raw)


def senders(messages: list[bytes]) -> list[str]:
    """Distinct From addresses (lower-case), at most ``MAX_CONTACTS``."""
    parser = BytesHeaderParser()
    seen: dict[str, None] = {}
    for raw in messages:
        try:
            value = parser.parsebytes(raw).get_all("From") or []
            pairs = getaddresses([str(v) for v in value])
        except Exception:  # noqa: S112 (odd corpus headers: that sender is simply not a contact)
            continue
        for _name, addr in pairs:
            if "@" in addr and addr.lower() != ADDRESS:
                seen.setdefault(addr.lower(), None)
    return list(seen)[:MAX_CONTACTS]


def append_all(dovecot: Dovecot, batch: list[bytes], workers: int) -> int:
    """APPEND ``batch`` to INBOX over ``workers`` imapclient sessions; return the last UID."""
    from concurrent.futures import ThreadPoolExecutor

    def run(part: list[bytes]) -> None:
        with dovecot.imap_session(ADDRESS) as client:
            for raw in part:
                client.append("INBOX", raw)

    parts = [batch[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, parts))
    with dovecot.imap_session(ADDRESS) as client:
        client.select_folder("INBOX", readonly=True)
        return int(max(client.search("ALL")))


def bare_fetch(dovecot: Dovecot, first_uid: int) -> tuple[int, int, float]:
    """imapclient UID FETCH BODY.PEEK[] of UIDs ≥ first_uid, chunked; (messages, bytes, s)."""
    started = time.perf_counter()
    count = size = 0
    with dovecot.imap_session(ADDRESS) as client:
        client.select_folder("INBOX", readonly=True)
        uids = sorted(client.search(["UID", f"{first_uid}:*"]))
        for i in range(0, len(uids), FETCH_CHUNK):
            fetched = client.fetch(uids[i : i + FETCH_CHUNK], ["BODY.PEEK[]"])
            count += len(fetched)
            size += sum(len(d[b"BODY[]"]) for d in fetched.values())
    return count, size, time.perf_counter() - started


async def read_int(db: Database, sql: str, **params: Any) -> int:
    def read(session: Any) -> int:
        return int(session.execute(sa.text(sql), params).scalar() or 0)

    return await db.read(read)


async def wait_for(check: Callable[[], Awaitable[bool]], limit_seconds: float) -> bool:
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def catchup_main(
    n: int, make_root: Callable[[], Path], add_mailboxes: Callable[..., Awaitable[None]]
) -> None:
    root = make_root()
    keys = TokenKeys(root / "keys")
    dovecot = Dovecot(keys, root=root / "dovecot")
    dovecot.start()
    try:
        await run_catchup(root, keys, dovecot, n, add_mailboxes)
    finally:
        dovecot.cleanup()


async def run_catchup(
    root: Path,
    keys: TokenKeys,
    dovecot: Dovecot,
    n: int,
    add_mailboxes: Callable[..., Awaitable[None]],
) -> None:
    assert dovecot.ports is not None
    corpus = corpus_messages()
    batch = list(take(corpus, n))
    dovecot.add_user(ADDRESS)
    dovecot.create_layout(ADDRESS, "gmail")
    url = f"sqlite:///{root / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    settings = gmail_settings(dovecot)
    service = MailboxService(db, settings)
    await add_mailboxes(db, service, keys, [ADDRESS])  # mailbox 1, user user0@crm.test
    contacts = 0
    for addr in senders(corpus):
        try:
            await db.run(add_contact, 1, addr, None, "user0@crm.test")
            contacts += 1
        except (ValueError, sa.exc.IntegrityError):
            continue  # an odd corpus address, or one whose key is already a contact
    spool = Spool(root / "spool")
    await asyncio.to_thread(spool.open)
    intake = Intake(
        db=db,
        blobs=BlobStore(root / "blobs"),
        spool=spool,
        bcc=settings.bcc,
        metrics=Metrics(),
        contact_initiated=contact_initiated_of(settings),
    )
    intake_task = asyncio.create_task(intake.run())
    try:
        await measure(dovecot, db, settings, service, intake, batch, len(corpus), contacts)
    finally:
        await intake.close()
        await intake_task
        await db.close()


async def measure(
    dovecot: Dovecot,
    db: Database,
    settings: Any,
    service: MailboxService,
    intake: Intake,
    batch: list[bytes],
    corpus_size: int,
    contacts: int,
) -> None:
    first = ImapSupervisor(settings, db, service, intake)
    await first.start()  # first sync: the checkpoint is set (UIDNEXT - 1), then IDLE
    await wait_for(lambda: _idle(first), 60)
    await first.stop()  # the outage
    started = time.perf_counter()
    last_uid = await asyncio.to_thread(append_all, dovecot, batch, APPEND_THREADS)
    appended = time.perf_counter() - started
    size = sum(len(m) for m in batch)
    print(
        f"(c) corpus: {corpus_size} messages, {contacts} sender contacts; APPENDed"
        f" {len(batch)} ({size / 1e6:.1f} MB) in {appended:.1f} s; last UID {last_uid}"
    )
    second = ImapSupervisor(settings, db, service, intake)
    started = time.perf_counter()
    await second.start()
    checkpoint = (
        "SELECT checkpoint_uid FROM folder_states WHERE mailbox_id = 1 AND folder = 'INBOX'"
    )

    async def caught_up() -> bool:
        return await read_int(db, checkpoint) >= last_uid

    done = await wait_for(caught_up, 60 + len(batch) * 0.2)
    ours = time.perf_counter() - started
    await second.stop()
    stored = await read_int(db, "SELECT COUNT(*) FROM messages")
    logged = await read_int(db, "SELECT COUNT(*) FROM sync_log WHERE mailbox_id = 1")
    quarantined = await read_int(db, "SELECT COUNT(*) FROM quarantine")
    bare_count, bare_bytes, bare = await asyncio.to_thread(bare_fetch, dovecot, 1)
    ours_rate = len(batch) / ours
    bare_rate = bare_count / bare
    state = "caught up" if done else "NOT caught up (timed out)"
    print(f"    mailgate: {state} in {ours:.1f} s: {ours_rate:.0f} msgs/s")
    print(f"      messages stored {stored}, sync-log rows {logged}, quarantined {quarantined}")
    print(
        f"    imapclient UID FETCH BODY.PEEK[] (chunks of {FETCH_CHUNK}), no storing:"
        f" {bare_count} msgs ({bare_bytes / 1e6:.1f} MB) in {bare:.1f} s: {bare_rate:.0f} msgs/s"
    )
    print(f"    ratio bare/mailgate: {bare_rate / ours_rate:.2f}x (target <= 2x)")
    parse_rate = prepare_only_rate(batch)
    print(
        f"    prepare() alone on the same messages (one core, no I/O, no routing, no storing):"
        f" {parse_rate:.0f} msgs/s = {bare_rate / parse_rate:.2f}x the bare fetch's time"
    )


def prepare_only_rate(batch: list[bytes]) -> float:
    """Messages per CPU second of ``ingest.pipeline.prepare`` alone over ``batch``.

    A floor for any design that parses each fetched message in this
    process: the catch-up cannot be faster than its parse.
    """
    origin = ImapOrigin(
        mailbox_id=MailboxId(1),
        folder="INBOX",
        folder_role="inbox",
        uidvalidity=UidValidity(1),
        uid=Uid(1),
    )
    messages = [raw_message(raw, origin) for raw in batch]
    started = time.process_time()
    for message in messages:
        prepare(message)
    return len(messages) / (time.process_time() - started)


async def _idle(supervisor: ImapSupervisor) -> bool:
    states = [s.state for s in supervisor.status()]
    return len(states) == 2 and all(s is WatcherState.IDLE for s in states)
