"""SMTP ingest throughput end to end, beside a bare aiosmtpd sink (prints figures).

Both servers run as separate processes on loopback, driven by the same
client: CONNECTIONS concurrent aiosmtplib connections, each sending its
share of COUNT ~10 KB messages on one SMTP session. The bare server is
``python -m aiosmtpd`` with ``aiosmtpd.handlers.Sink`` (accept and
discard). mailgate runs ``mailgate serve`` on SQLite in a temp dir, with
durability kept (spooled; raw and attachment blobs fsynced and the batch
committed before each 250).

Also prints each server's CPU time per message (user + system, all
threads, from /proc) and mailgate's mean time per ingest stage (receive:
the worker-thread hop that spools, prepares and stages blobs; queued: the
wait for the batcher; load_facts, decide, apply; publish_wait: what the
batch waited for its blobs' fsyncs; commit).

Run it on a quiet machine, and not within ~6 minutes of deleting many
files on the same filesystem (a previous run's temporary directory, a test
run): on this VM's ext4 (no journal, online discard) every new inode then
skips the recently deleted ones (``recently_deleted``: 60 s, 360 s while
their inode table block is dirty) and the discards slow the disk; back to
back, the gateway's figure drops by about a fifth. A deployment never
deletes blobs, so that is not its steady state.

Usage: .venv/bin/python bench/bench_smtp.py [--count 2000] [--connections 20] [--workdir DIR]
Not a test: it prints figures and never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
USER = "bench-user@example.org"
MESSAGE_BYTES = 10 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def print_stages(metrics: str) -> None:
    """Print the gateway's mean time per ingest stage (wall, including waits) from /metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        for suffix, into in (("_sum{", sums), ("_count{", counts)):
            if line.startswith("mailgate_ingest_stage_seconds" + suffix):
                into[line.split('"')[1]] = float(line.split()[-1])
    print("  mailgate stages (mean wall time per call, calls):")
    for stage, total in sums.items():
        print(f"    {stage:13} {total / counts[stage] * 1e3:7.2f} ms x {counts[stage]:.0f}")


def message(index: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = USER
    msg["To"] = f"contact{index % 50}@example.com"
    msg["Subject"] = f"bench {index}"
    msg["Message-ID"] = make_msgid(idstring=f"b{index}", domain="bench.example.org")
    msg.set_content(("lorem ipsum dolor sit amet " * 3 + "\n") * (MESSAGE_BYTES // 82))
    return msg.as_bytes(policy=SMTP_POLICY)


async def wait_port(port: int) -> None:
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


async def drive(
    port: int, rcpt: str, messages: list[bytes], connections: int, server_pid: int
) -> float:
    """Send every message over ``connections`` sessions; return messages/s.

    Also prints the server process's CPU time per message (user + system,
    all threads) over the same interval.
    """
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for raw in messages:
        queue.put_nowait(raw)

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await client.connect()
        while not queue.empty():
            raw = queue.get_nowait()
            await client.sendmail(USER, [rcpt], raw)
        await client.quit()

    start, cpu_start = time.perf_counter(), cpu_seconds(server_pid)
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    user, system = (b - a for a, b in zip(cpu_start, cpu_seconds(server_pid), strict=True))
    count = len(messages)
    print(
        f"  server CPU per message: {(user + system) / count * 1e3:.2f} ms"
        f" (user {user / count * 1e3:.2f}, system {system / count * 1e3:.2f};"
        f" {(user + system) / elapsed:.0%} of a core)"
    )
    return len(messages) / elapsed


def mailgate(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "-c", str(root / "c.toml")],
        capture_output=True,
        env=env(),
        cwd=root,
        check=True,
        text=True,
    )
    return done.stdout.strip()


async def bench_mailgate(root: Path, messages: list[bytes], connections: int) -> float:
    smtp_port, http_port = free_port(), free_port()
    (root / "c.toml").write_text(
        f'[storage]\ndatabase_url = "sqlite+aiosqlite:///{root}/db.sqlite"\n'
        f'data_dir = "{root}/data"\n[smtp]\nport = {smtp_port}\n[http]\nport = {http_port}\n'
    )
    mailgate(root, "subaccount", "add", "bench")
    mailgate(root, "user", "add", USER, "--name", "Bench", "--subaccount", "bench")
    rcpt = json.loads(mailgate(root, "bcc-address", USER, "--subaccount", "bench", "--json"))
    with (root / "serve.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "gateway", "serve", "-c", str(root / "c.toml")],
            env=env(),
            cwd=root,
            stdout=log,
            stderr=log,
        )
    try:
        await wait_port(smtp_port)
        rate = await drive(smtp_port, rcpt["address"], messages, connections, proc.pid)
        url = f"http://127.0.0.1:{http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: ASYNC210
            print_stages(response.read().decode())
        return rate
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def bench_sink(messages: list[bytes], connections: int) -> float:
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_port(port)
        return await drive(port, "anyone@example.com", messages, connections, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the gateway's files in this new directory instead of a deleted temp dir"
        " (for back-to-back runs: see the docstring on deleting many files)",
    )
    args = parser.parse_args()
    messages = [message(i) for i in range(args.count)]
    size = sum(len(m) for m in messages) / len(messages)
    print(f"{args.count} messages of {size:.0f} bytes, {args.connections} connections")
    sink = await bench_sink(messages, args.connections)
    print(f"bare aiosmtpd Sink:          {sink:8.1f} msg/s")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True)
        gated = await bench_mailgate(args.workdir.resolve(), messages, args.connections)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            gated = await bench_mailgate(Path(tmp), messages, args.connections)
    print(f"mailgate (stored, durable):  {gated:8.1f} msg/s")
    print(f"ratio mailgate / bare:       {gated / sink:8.2f}x  (target >= 0.3x)")


if __name__ == "__main__":
    asyncio.run(main())
