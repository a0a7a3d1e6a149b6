"""IMAP watchers against a local Dovecot: sessions kept in IDLE, RSS, APPEND→commit latency.

Issue 4 item 8 (a) and (b). Starts its own testbed Dovecot (tests/testbed),
creates MAILBOXES users with the Gmail layout, inserts one connected
mailbox row per user (tokens minted by the testbed, encrypted as the
MailboxService stores them), starts the real ``ImapSupervisor`` + ``Intake``
on SQLite in a temp dir and waits until every watcher (INBOX and Sent, so
2 IMAP sessions per mailbox) is in IDLE. Then:

(a) prints sessions in IDLE, the process RSS before/after (VmRSS from
    /proc) and the RSS added per session;
(b) APPENDs MESSAGES messages to random mailboxes' INBOX, one at a time,
    and prints APPEND-start → committed (the intake's commit returned)
    median and p99, beside a bare aioimaplib IDLE client's APPEND-start →
    EXISTS on another user in the same run (Dovecot itself waits ~0.5 s
    before notifying).

(d) (``--fetch-ab N``, run instead of (a)/(b)) bulk UID FETCH speed of
    ``ImapSession`` with the shrunk TLS read buffer against asyncio's
    256 KiB one: N corpus messages APPENDed once, then fetched in chunks
    of ``FETCH_CHUNK`` over fresh sessions, alternating buffer sizes, 4
    rounds (only the fetch is timed: no parsing, no storing).

(c) (``--catchup N``, run instead of (a)/(b)) catch-up after an outage:
    one Gmail-like mailbox whose corpus senders are contacts assigned to
    its user; the watchers sync once and stop; N real corpus messages
    (``bench_imap_catchup.py``) are APPENDed to INBOX; a new supervisor
    starts and the time until the INBOX checkpoint reaches the last UID
    is measured, beside imapclient fetching the same UIDs (UID FETCH
    BODY.PEEK[] in chunks of ``FETCH_CHUNK``) without storing.

The bench's Dovecot shares imap processes (``BENCH_DOVECOT``: 100
clients per process) so every IDLE uses inotify: Linux allows 128 inotify
instances per uid (``fs.inotify.max_user_instances``), and one imap
process per session would fall back to 30 s polling past ~128 sessions.
The bench raises its own open-files limit to 2 fds per session + slack.

Usage: .venv/bin/python bench/bench_imap.py [--mailboxes 100] [--messages 40]
           [--tls-buffer BYTES] [--tracemalloc]
       .venv/bin/python bench/bench_imap.py --catchup 5000 [--tls-buffer BYTES]
       .venv/bin/python bench/bench_imap.py --fetch-ab 2000
Not a test: it prints figures and never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import random
import resource
import ssl
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from aioimaplib import aioimaplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_imap_catchup import gmail_settings  # noqa: E402
from gateway.config import Security  # noqa: E402
from gateway.imap import session as session_module  # noqa: E402
from gateway.imap.session import FETCH_CHUNK, Endpoint, ImapSession  # noqa: E402
from gateway.imap.supervisor import ImapSupervisor, contact_initiated_of  # noqa: E402
from gateway.imap.watcher import WatcherState  # noqa: E402
from gateway.intake import Intake  # noqa: E402
from gateway.mailboxes import MailboxService  # noqa: E402
from gateway.observability import Metrics  # noqa: E402
from gateway.spool import Spool  # noqa: E402
from ingest.types import Provider  # noqa: E402
from storage.blobs import BlobStore  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.repos.directory import add_subaccount, add_user  # noqa: E402
from storage.repos.mailboxes import NewCredentials, save_connected  # noqa: E402
from tests.testbed.dovecot import Dovecot  # noqa: E402
from tests.testbed.tokens import TokenKeys  # noqa: E402

BENCH_DOVECOT = """
service imap {
  service_count = 0
  client_limit = 100
  process_limit = 64
}
"""
"""Appended to the testbed's dovecot.conf: 2,000 sessions in ~20 shared imap processes."""

FD_SLACK = 1024
"""Open files beyond 2 per session: the database, blobs, Dovecot helper sessions."""


def raise_fd_limit(sessions: int) -> int:
    """Raise RLIMIT_NOFILE to 2 fds per session + slack (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * sessions + FD_SLACK
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def raw_message(to: str) -> tuple[str, bytes]:
    msg = EmailMessage()
    mid = make_msgid(domain="bench.test")
    msg["From"] = "contact@customer.test"
    msg["To"] = to
    msg["Subject"] = "bench"
    msg["Message-ID"] = mid
    msg.set_content("hello\n" * 50)
    return mid, msg.as_bytes()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def add_mailboxes(
    db: Database, service: MailboxService, keys: TokenKeys, addresses: list[str]
) -> None:
    sub = await db.run(add_subaccount, "bench")
    now = datetime.now(UTC)
    expires = now + timedelta(hours=2)
    for i, address in enumerate(addresses):
        user_id = await db.run(add_user, f"user{i}@crm.test", f"User {i}", [sub])
        secret = {
            "kind": "oauth",
            "access_token": keys.mint(address, ttl_seconds=7200),
            "refresh_token": "unused",
            "expires_at": expires.isoformat(),
        }
        new = NewCredentials(
            user_id=user_id,
            subaccount_id=sub,
            provider=Provider.GMAIL,
            address=address,
            credentials_ciphertext=service.cipher.encrypt_json(secret),
            token_expires_at=expires,
        )
        await db.run(save_connected, new, now=now, webhook_urls=())


async def wait_idle(supervisor: ImapSupervisor, sessions: int, limit_seconds: float) -> int:
    started = time.monotonic()
    deadline = started + limit_seconds
    shown = started
    idle = 0
    while time.monotonic() < deadline:
        states = Counter(s.state.value for s in supervisor.status())
        idle = states[WatcherState.IDLE.value]
        if idle >= sessions:
            break
        if time.monotonic() - shown >= 10:
            shown = time.monotonic()
            print(f"    {shown - started:5.0f} s: {dict(sorted(states.items()))}", flush=True)
        await asyncio.sleep(0.2)
    return idle


async def bare_idle_latencies(
    dovecot: Dovecot, keys: TokenKeys, address: str, n: int
) -> list[float]:
    """APPEND-start → EXISTS seen by a bare aioimaplib IDLE client."""
    assert dovecot.ports is not None
    client = aioimaplib.IMAP4_SSL(
        "127.0.0.1",
        dovecot.ports.imaps,
        ssl_context=ssl.create_default_context(cafile=str(dovecot.ca_file)),
    )
    await client.wait_hello_from_server()
    await client.xoauth2(address, keys.mint(address))
    await client.select("INBOX")
    out: list[float] = []
    for _ in range(n):
        idle = await client.idle_start(timeout=60)
        _mid, raw = raw_message(address)
        start = time.perf_counter()
        await asyncio.to_thread(dovecot.append, address, "INBOX", raw)
        while True:
            push = await client.wait_server_push(timeout=60)
            if any(b"EXISTS" in line for line in push):
                break
        out.append(time.perf_counter() - start)
        client.idle_done()
        await asyncio.wait_for(idle, 10)
    await client.logout()
    return out


def make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="mailgate-bench-imap-"))
    root.chmod(0o755)  # Dovecot (user dovecot) reads the key files below it
    (root / "keys").mkdir()
    (root / "dovecot").mkdir()
    return root


async def main(mailboxes: int, messages: int, *, trace: bool) -> None:
    root = make_root()
    keys = TokenKeys(root / "keys")
    limit = raise_fd_limit(2 * mailboxes)
    print(f"open-files limit {limit}; TLS read buffer {session_module.TLS_READ_BUFFER_BYTES} B")
    dovecot = Dovecot(keys, root=root / "dovecot", extra_config=BENCH_DOVECOT)
    dovecot.start()
    try:
        await run(root, keys, dovecot, mailboxes, messages, trace=trace)
    finally:
        dovecot.cleanup()


async def run(
    root: Path, keys: TokenKeys, dovecot: Dovecot, mailboxes: int, messages: int, *, trace: bool
) -> None:
    assert dovecot.ports is not None
    addresses = [f"bench{i}@example.test" for i in range(mailboxes)]
    for address in [*addresses, "bare@example.test"]:
        dovecot.add_user(address)
    for address in addresses:
        dovecot.create_layout(address, "gmail")
    url = f"sqlite:///{root / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    settings = gmail_settings(dovecot)
    service = MailboxService(db, settings)
    await add_mailboxes(db, service, keys, addresses)
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
    committed: dict[tuple[int, int], float] = {}
    original = intake.accept_fetched_many

    async def timed(batch: Any, *, previous_uid: int | None = None) -> Any:
        result = await original(batch, previous_uid=previous_uid)
        done = time.perf_counter()
        for _raw, origin in batch:
            if origin.folder == "INBOX":
                committed[origin.mailbox_id, origin.uid] = done
        return result

    intake.accept_fetched_many = timed  # type: ignore[method-assign,assignment]
    intake_task = asyncio.create_task(intake.run())
    supervisor = ImapSupervisor(settings, db, service, intake)
    sessions = 2 * mailboxes
    gc.collect()
    if trace:
        tracemalloc.start(8)
    traced_before = tracemalloc.take_snapshot() if trace else None
    before = rss_kib()
    started = time.perf_counter()
    await supervisor.start()
    idle = await wait_idle(supervisor, sessions, limit_seconds=60 + mailboxes * 0.2)
    ramp = time.perf_counter() - started
    gc.collect()
    await asyncio.sleep(1.0)  # let the last sessions' first IDLE settle
    after = rss_kib()
    print(f"(a) sessions in IDLE: {idle}/{sessions} after {ramp:.1f} s")
    per_session = (after - before) / max(idle, 1)
    print(f"    RSS {before} KiB -> {after} KiB: {per_session:.1f} KiB per session")
    trimmed = malloc_trim_rss_kib()
    if trimmed is not None:
        print(
            f"    after malloc_trim(0): {trimmed} KiB, {(trimmed - before) / max(idle, 1):.1f} KiB"
            " per session (the rest of the difference was freed heap kept by glibc)"
        )
    print(f"    Dovecot imap processes: {dovecot_imap_processes()}")
    if traced_before is not None:
        show_traced(traced_before, tracemalloc.take_snapshot(), max(idle, 1))
        tracemalloc.stop()
    ours = await append_latencies(dovecot, addresses, messages, committed)
    bare = await bare_idle_latencies(dovecot, keys, "bare@example.test", messages)
    show("(b) APPEND -> committed (mailgate)", ours)
    show("    APPEND -> EXISTS (bare aioimaplib IDLE)", bare)
    added = 1000 * (statistics.median(ours) - statistics.median(bare))
    added_p99 = 1000 * (pct(ours, 0.99) - pct(bare, 0.99))
    print(f"    added latency: median difference {added:.1f} ms, p99 difference {added_p99:.1f} ms")
    await supervisor.stop()
    await intake.close()
    await intake_task
    await db.close()


async def append_latencies(
    dovecot: Dovecot, addresses: list[str], n: int, committed: dict[tuple[int, int], float]
) -> list[float]:
    rng = random.Random(7)
    out: list[float] = []
    for _ in range(n):
        index = rng.randrange(len(addresses))
        _mid, raw = raw_message(addresses[index])
        start = time.perf_counter()
        uid = await asyncio.to_thread(dovecot.append, addresses[index], "INBOX", raw)
        key = (index + 1, uid)  # mailbox rows were inserted in address order: id = index + 1
        deadline = time.monotonic() + 15
        while key not in committed and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)  # the commit time itself is recorded exactly
        if key in committed:
            out.append(committed[key] - start)
    return out


def malloc_trim_rss_kib() -> int | None:
    """RSS after glibc's ``malloc_trim(0)`` (free heap returned to the OS); None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return rss_kib()


async def fetch_ab(count: int) -> None:
    """(d): the same UIDs fetched with each TLS read buffer size, alternated, 4 rounds."""
    from bench.bench_imap_catchup import corpus_messages

    root = make_root()
    keys = TokenKeys(root / "keys")
    dovecot = Dovecot(keys, root=root / "dovecot")
    dovecot.start()
    try:
        assert dovecot.ports is not None
        user = "fetch@example.test"
        dovecot.add_user(user)
        corpus = corpus_messages()
        messages = [corpus[i % len(corpus)] for i in range(count)]
        with dovecot.imap_session(user) as client:
            for raw in messages:
                client.append("INBOX", raw)
        size_mb = sum(map(len, messages)) / 1e6
        endpoint = Endpoint(
            host=dovecot.host,
            port=dovecot.ports.imaps,
            security=Security.TLS,
            ca_file=dovecot.ca_file,
        )
        timings: dict[int, list[float]] = {}
        sizes = (session_module.TLS_READ_BUFFER_BYTES, 256 * 1024)
        for _round in range(4):
            for size in sizes:
                timings.setdefault(size, []).append(await timed_fetch(endpoint, keys, user, size))
        print(
            f"(d) UID FETCH of {count} corpus messages ({size_mb:.1f} MB), chunks of {FETCH_CHUNK}"
        )
        for size, values in timings.items():
            rounds = ", ".join(f"{v:.3f}" for v in values)
            print(
                f"    TLS buffer {size:>6} B: median {statistics.median(values):.3f} s ({rounds})"
            )
    finally:
        dovecot.cleanup()


async def timed_fetch(endpoint: Endpoint, keys: TokenKeys, user: str, size: int) -> float:
    """Seconds to UID FETCH every message of INBOX over a new session with ``size`` buffer."""
    session_module.TLS_READ_BUFFER_BYTES = size
    session = await ImapSession.open(endpoint)
    try:
        await session.authenticate_xoauth2(user, keys.mint(user))
        await session.select("INBOX")
        uids = await session.uids_since(1)
        started = time.perf_counter()
        for start in range(0, len(uids), FETCH_CHUNK):
            await session.fetch(uids[start : start + FETCH_CHUNK])
        return time.perf_counter() - started
    finally:
        await session.logout()


def dovecot_imap_processes() -> int:
    """Count processes named ``imap`` (the bench's Dovecot is the only one expected)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += (entry / "comm").read_text().strip() == "imap"
            except OSError:
                continue
    return count


def show_traced(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, sessions: int) -> None:
    """Print Python heap growth (tracemalloc) per session: total and the top 12 sites."""
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"    Python heap (tracemalloc): +{total / 1024 / sessions:.1f} KiB per session; top:")
    for stat in stats[:12]:
        frame = stat.traceback[0]
        name = "/".join(Path(frame.filename).parts[-2:])
        per = stat.size_diff / 1024 / sessions
        print(
            f"      {per:7.2f} KiB  {stat.count_diff / sessions:6.1f} blocks  {name}:{frame.lineno}"
        )


def show(label: str, values: list[float]) -> None:
    if not values:
        print(f"{label}: no samples")
        return
    print(
        f"{label}: n={len(values)} median {1000 * statistics.median(values):.1f} ms,"
        f" p99 {1000 * pct(values, 0.99):.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=100)
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--catchup", type=int, default=0, help="run (c) with N messages")
    parser.add_argument(
        "--tls-buffer",
        type=int,
        default=session_module.TLS_READ_BUFFER_BYTES,
        help="TLS read buffer per session in bytes (262144 = asyncio's default, no shrink)",
    )
    parser.add_argument("--fetch-ab", type=int, default=0, help="run (d) with N messages")
    parser.add_argument("--tracemalloc", action="store_true", help="print Python heap per session")
    args = parser.parse_args()
    session_module.TLS_READ_BUFFER_BYTES = args.tls_buffer  # A/B switch of this bench only
    if args.fetch_ab:
        asyncio.run(fetch_ab(args.fetch_ab))
    elif args.catchup:
        from bench.bench_imap_catchup import catchup_main

        asyncio.run(catchup_main(args.catchup, make_root, add_mailboxes))
    else:
        asyncio.run(main(args.mailboxes, args.messages, trace=args.tracemalloc))
