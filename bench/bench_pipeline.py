"""Benchmark (a) of issue 2: ingest pipeline throughput on the whole corpus.

Prints messages/s and MB/s of ``ingest.pipeline.prepare`` (parse, normalise,
identity, thread links, forward detection) beside the chosen parser's bare
parse of the same bytes, in the same run, and their ratio (target ≥ 0.5).
Not a test: it asserts nothing about time.

Usage: .venv/bin/python bench/bench_pipeline.py [--rounds N] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import mailbox
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from ingest.pipeline import prepare
from ingest.types import RawMessage, SmtpEnvelope

ROOT = Path(__file__).resolve().parents[1]


def corpus_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    env = os.environ.get("MAILGATE_CORPUS")
    return Path(env) if env else ROOT.parent / "shared" / "corpus"


def load_messages(root: Path) -> list[bytes]:
    """Every .eml under mime/ and every message of every mbox, as bytes."""
    out = [p.read_bytes() for p in sorted((root / "mime").rglob("*.eml"))]
    for path in sorted(root.rglob("*.mbox*")):
        if path.suffix == ".json" or not path.is_file():
            continue
        box = mailbox.mbox(path, create=False)
        out.extend(m.as_bytes(unixfrom=False) for m in box)
    return out


def envelope() -> SmtpEnvelope:
    return SmtpEnvelope(
        envelope_sender="user@example.com",
        envelope_recipients=("u-aaaaaaaaaaaaaaaaaaaa@bcc.example.test",),
        peer="127.0.0.1",
        helo="bench",
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def timed(fn: Callable[[bytes], object], messages: list[bytes], rounds: int) -> tuple[float, float]:
    """Return the median wall time and the median CPU time of one pass, in seconds.

    The wall time is the figure the ratio uses; the CPU time (this process
    only) is printed beside it because other work on the shared machine
    stretches wall time, the pipeline's longer passes more.
    """
    runs = []
    cpu_runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        cpu_start = time.process_time()
        for raw in messages:
            fn(raw)
        cpu_runs.append(time.process_time() - cpu_start)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), statistics.median(cpu_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus")
    args = parser.parse_args()
    messages = load_messages(corpus_dir(args.corpus))
    total_mb = sum(len(m) for m in messages) / 1e6
    env = envelope()

    def pipeline(raw: bytes) -> object:
        sha = hashlib.sha256(raw).hexdigest()
        return prepare(RawMessage(raw=raw, provenance=env, sha256=sha))

    def bare(raw: bytes) -> object:
        return email.message_from_bytes(raw, policy=email.policy.compat32)

    bare_s, bare_cpu = timed(bare, messages, args.rounds)
    pipe_s, pipe_cpu = timed(pipeline, messages, args.rounds)
    n = len(messages)
    print(f"corpus: {n} messages, {total_mb:.1f} MB, median of {args.rounds} rounds")
    for name, secs in (("bare parse (email, compat32)", bare_s), ("pipeline prepare()", pipe_s)):
        print(f"{name:32s} {secs:7.3f} s  {n / secs:8.0f} msg/s  {total_mb / secs:6.1f} MB/s")
    print(f"ratio pipeline/bare: {bare_s / pipe_s:.2f}x (target >= 0.5x)")
    print(
        f"detail: CPU time per pass bare {bare_cpu:.3f} s, prepare() {pipe_cpu:.3f} s,"
        f" ratio {bare_cpu / pipe_cpu:.2f}x; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
