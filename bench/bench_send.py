"""CRM sends through the outbound queue: sends per second beside bare smtplib; peak memory of 25 MB.

Issue 5 item 8. The parent process starts the testbed (tests/testbed: JWT
keys, OAuth2 server, Dovecot, the provider-like submission server with
STARTTLS + AUTH XOAUTH2), connects one Gmail mailbox through the real OAuth
flow (``MailboxService``) on SQLite in a temp dir, then runs each
measurement in a fresh child process, so the servers' own work and memory
are not counted:

(a) ``throughput``: N individual sends ``enqueue``d (each: composed,
    blob written, ``queued`` committed), then ``process_due`` (each
    attempt: ``queued → sending`` committed, one mail transaction, ``sent``
    + the conversation copy committed; the sends of one mailbox share one
    SMTP session with STARTTLS + XOAUTH2, as a real client's would);
    beside smtplib sending the very same bytes to the same server in the
    same child, one session per message and on one reused session. Prints
    messages per second and queue ÷ smtplib for both (target ≥ 0.7× against
    per-message sessions; since the queue reuses its session, the reused
    figure is the like-for-like one, and it is printed too). ``--profile``
    writes cProfile stats of the queue run (the event-loop thread only).
(b) ``memory``: one send whose composed message is about 25 MB (one
    random attachment) through ``enqueue`` + ``process``; prints the
    tracemalloc peak and the RSS high-water growth (VmHWM after − VmRSS
    before, /proc/self/status) against the composed size (target ≤ 3×).

With ``--bare-server`` the sender has no Gmail folder layout, so the
submission server files no Sent copy (one IMAP APPEND less per message),
which leaves more of each send's time to the gateway.

Usage: .venv/bin/python bench/bench_send.py [--messages 100] [--size-mb 25] [--bare-server]
Not a test: it prints figures and never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.config import Settings, make_settings  # noqa: E402
from gateway.mailboxes import MailboxService  # noqa: E402
from gateway.oauth import RetryPolicy  # noqa: E402
from gateway.outbound import OutboundService, SendRequest  # noqa: E402
from ingest.compose import OutgoingAttachment  # noqa: E402
from ingest.types import Provider  # noqa: E402
from storage.blobs import BlobStore  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models.enums import OutboundState  # noqa: E402
from storage.repos import outbound as repo  # noqa: E402
from storage.repos.directory import add_contact, add_subaccount, add_user  # noqa: E402
from tests.integration.send_env import (  # noqa: E402
    FLAVOUR,
    SUBACCOUNT,
    USER_EMAIL,
    Clock,
    SendEnv,
    connect,
    provider_settings,
)
from tests.testbed.dovecot import Dovecot  # noqa: E402
from tests.testbed.oauth_server import OAuthProvider  # noqa: E402
from tests.testbed.plugin import make_user  # noqa: E402
from tests.testbed.submission import SubmissionServer  # noqa: E402
from tests.testbed.tokens import TokenKeys  # noqa: E402

CONTACT = "contact@example.net"  # not a Dovecot user: recorded by the server, not delivered
MB = 1_000_000
MIB = 1024 * 1024
WARMUP = 3


# ------------------------------------------------------------------ parent


def _settings_doc(
    root: Path, oauth: OAuthProvider, dovecot: Dovecot, submission: SubmissionServer
) -> dict[str, Any]:
    clients = {
        p: oauth.register_client(f, ("http://127.0.0.1:9/oauth/callback",))
        for p, f in FLAVOUR.items()
    }
    limits = {"gmail": {"daily_send_limit": 1_000_000, "max_message_bytes": 40 * MIB}}
    return {
        "storage": {
            "database_url": f"sqlite+aiosqlite:///{root / 'mailgate.db'}",
            "data_dir": str(root),
        },
        "security": {"token_key": Fernet.generate_key().decode()},
        "http": {"public_url": "http://127.0.0.1:9"},
        "providers": provider_settings(oauth, dovecot, submission, clients, limits),
    }


async def _prepare(settings: Settings, sender: Any) -> None:
    """Seed the directory and connect ``sender``'s Gmail mailbox through the OAuth flow."""
    url = settings.storage.database_url
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    try:
        sub_id = await db.run(add_subaccount, SUBACCOUNT)
        await db.run(add_user, USER_EMAIL, "CRM User", [sub_id])
        await db.run(add_contact, sub_id, CONTACT, "Bench Contact", USER_EMAIL)
        retry = RetryPolicy(attempts=2, initial_seconds=0.01, max_seconds=0.05)
        mailboxes = MailboxService(db, settings, retry=retry)
        blobs = BlobStore(Path(settings.storage.data_dir) / "blobs")
        outbound = OutboundService(db, settings, mailboxes, blobs)
        env = SendEnv(db=db, mailboxes=mailboxes, outbound=outbound, blobs=blobs, clock=Clock())
        await connect(env, Provider.GMAIL, sender)
    finally:
        await db.close()


def _child(mode: str, config: Path, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(config), *extra],
        capture_output=True,
        check=False,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if done.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_parent(args: argparse.Namespace) -> None:
    # aiosmtpd 1.4 logs a deprecation on its own attribute access (the submission server)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-send-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Dovecot (user dovecot) reads the key files below it
        keys = TokenKeys(root / "keys")
        oauth = OAuthProvider(keys)
        oauth.start()
        dovecot = Dovecot(keys)
        dovecot.start()
        submission = SubmissionServer(
            keys, dovecot, cert_file=dovecot.ca_file, key_file=dovecot.root / "key.pem"
        )
        submission.start()
        try:
            sender = make_user(dovecot, keys, None if args.bare_server else "gmail")
            doc = _settings_doc(root, oauth, dovecot, submission)
            asyncio.run(_prepare(make_settings(**doc), sender))
            doc["bench"] = {"sender": sender.address, "token": sender.mint_token(7200)}
            config = root / "bench.json"
            config.write_text(json.dumps(doc))
            before = len(submission.transactions)
            profile = (str(Path(args.profile).resolve()),) if args.profile else ()
            figures = _child("throughput", config, str(args.messages), *profile)
            received = len(submission.transactions) - before
            memory = _child("memory", config, str(args.size_mb))
        finally:
            submission.stop()
            dovecot.cleanup()
            oauth.stop()
    _report(args, sender.layout, figures, received, memory)


def _report(
    args: argparse.Namespace,
    layout: str | None,
    t: dict[str, Any],
    received: int,
    m: dict[str, Any],
) -> None:
    n = args.messages
    print(f"# bench_send: {n} messages of {t['message_bytes']} bytes, sender layout {layout}")
    print(f"server transactions received in the throughput child: {received}")
    print(f"(a) queue (enqueue {n}, then process_due): {n / t['queue_seconds']:.1f} msg/s")
    print(f"    enqueue {t['enqueue_seconds']:.3f} s, process {t['process_seconds']:.3f} s")
    print(f"    sent rows: {t['sent']} of {n}")
    print(f"    smtplib, one session per message: {n / t['smtplib_seconds']:.1f} msg/s")
    print(f"    smtplib, one reused session:      {n / t['smtplib_reused_seconds']:.1f} msg/s")
    ratio = t["smtplib_seconds"] / t["queue_seconds"]
    print(f"    queue / smtplib (per-message sessions): {ratio:.2f}x (target >= 0.7x)")
    reused = t["smtplib_reused_seconds"] / t["queue_seconds"]
    print(f"    queue / smtplib (one reused session):   {reused:.2f}x (like for like)")
    size = m["message_bytes"]
    print(f"(b) one message of {size} bytes ({size / MB:.1f} MB), state {m['state']}")
    peak = m["tracemalloc_peak_bytes"]
    print(
        f"    tracemalloc peak: {peak / MB:.1f} MB = {peak / size:.2f}x the message (target <= 3x)"
    )
    rss = m["rss_growth_bytes"]
    print(
        f"    RSS high-water growth (VmHWM - VmRSS before): {rss / MB:.1f} MB = {rss / size:.2f}x"
    )
    print(f"    (the {m['attachment_bytes'] / MB:.1f} MB attachment payload existed before both)")


# ------------------------------------------------------------------ children


def _request(i: int, attachments: tuple[OutgoingAttachment, ...] = ()) -> SendRequest:
    text = f"Bench message {i}.\n\n" + "Lorem ipsum dolor sit amet. " * 40
    return SendRequest(
        user=USER_EMAIL,
        subaccount=SUBACCOUNT,
        to=(CONTACT,),
        subject=f"Bench {i}",
        text=text,
        attachments=attachments,
    )


def _service(settings: Settings) -> tuple[Database, OutboundService, BlobStore]:
    db = Database(settings.storage.database_url)
    blobs = BlobStore(Path(settings.storage.data_dir) / "blobs")
    outbound = OutboundService(db, settings, MailboxService(db, settings), blobs)
    return db, outbound, blobs


async def _queue_run(settings: Settings, n: int, first: int) -> dict[str, Any]:
    db, outbound, blobs = _service(settings)
    try:
        for i in range(WARMUP):
            await outbound.send(_request(-1 - i))
        started = time.perf_counter()
        ids = [(await outbound.enqueue(_request(first + i))).id for i in range(n)]
        enqueued = time.perf_counter()
        while await outbound.process_due(limit=n):
            pass
        finished = time.perf_counter()
        records = [await db.read(repo.get_outbound, i) for i in ids]
    finally:
        await db.close()
    return {
        "enqueue_seconds": enqueued - started,
        "process_seconds": finished - enqueued,
        "queue_seconds": finished - started,
        "sent": sum(r.state == OutboundState.SENT for r in records),
        "contents": [blobs.get(r.raw_sha256 or "") for r in records],
    }


def _xoauth2(user: str, token: str) -> Any:
    return lambda challenge=None: f"user={user}\x01auth=Bearer {token}\x01\x01"


def _smtplib_session(doc: dict[str, Any], tls: ssl.SSLContext) -> smtplib.SMTP:
    gmail = doc["providers"]["gmail"]
    client = smtplib.SMTP(gmail["smtp_host"], gmail["smtp_port"], timeout=30)
    client.starttls(context=tls)
    client.ehlo()
    client.auth("XOAUTH2", _xoauth2(doc["bench"]["sender"], doc["bench"]["token"]))
    return client


def _smtplib_run(doc: dict[str, Any], contents: list[bytes], *, reuse: bool) -> float:
    sender = doc["bench"]["sender"]
    started = time.perf_counter()
    # the gateway's trust: system CAs plus providers.gmail.ca_file; built once, as a client would
    tls = ssl.create_default_context()
    tls.load_verify_locations(cafile=doc["providers"]["gmail"]["ca_file"])
    client = _smtplib_session(doc, tls) if reuse else None
    for content in contents:
        if reuse and client is not None:
            client.sendmail(sender, [CONTACT], content)
            continue
        with _smtplib_session(doc, tls) as one:
            one.sendmail(sender, [CONTACT], content)
    if client is not None:
        client.quit()
    return time.perf_counter() - started


def child_throughput(doc: dict[str, Any], n: int, profile: str | None) -> dict[str, Any]:
    settings = make_settings(**{k: v for k, v in doc.items() if k != "bench"})
    if profile:
        import cProfile

        with cProfile.Profile() as prof:
            queue = asyncio.run(_queue_run(settings, n, 0))
        prof.dump_stats(profile)
    else:
        queue = asyncio.run(_queue_run(settings, n, 0))
    contents = queue.pop("contents")
    _smtplib_run(doc, contents[:WARMUP], reuse=False)
    queue["smtplib_seconds"] = _smtplib_run(doc, contents, reuse=False)
    queue["smtplib_reused_seconds"] = _smtplib_run(doc, contents, reuse=True)
    queue["message_bytes"] = len(contents[0])
    return queue


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


async def _big_send(settings: Settings, payload: bytes) -> dict[str, Any]:
    db, outbound, blobs = _service(settings)
    try:
        await outbound.send(_request(-1))  # warm: imports, connections, TLS
        attachment = OutgoingAttachment(
            filename="big.bin", content_type="application/octet-stream", payload=payload
        )
        request = _request(0, (attachment,))
        rss_before = _vm("VmRSS")
        tracemalloc.start()
        record = await outbound.send(request)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        hwm = _vm("VmHWM")
        size = len(await asyncio.to_thread(blobs.get, record.raw_sha256 or ""))
    finally:
        await db.close()
    return {
        "state": record.state.value,
        "error": record.last_error,
        "message_bytes": size,
        "attachment_bytes": len(payload),
        "tracemalloc_peak_bytes": peak,
        "rss_growth_bytes": hwm - rss_before,
    }


def child_memory(doc: dict[str, Any], size_mb: float) -> dict[str, Any]:
    settings = make_settings(**{k: v for k, v in doc.items() if k != "bench"})
    # base64 makes 4 characters of 3 bytes, plus CRLF every 76 (RFC 2045 §6.8)
    payload = os.urandom(int(size_mb * MB * 3 / 4 * 76 / 78) - 8192)
    return asyncio.run(_big_send(settings, payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size-mb", type=float, default=25.0)
    parser.add_argument("--bare-server", action="store_true")
    parser.add_argument(
        "--profile", metavar="PATH", help="write cProfile stats of the queue run to PATH"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        run_parent(args)
        return
    mode, config, value, *rest = args.child
    doc = json.loads(Path(config).read_text())
    if mode == "throughput":
        result = child_throughput(doc, int(value), rest[0] if rest else None)
    else:
        result = child_memory(doc, float(value))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
