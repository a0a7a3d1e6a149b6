"""Measure MIME parsers on the corpus: failures, lost fields, speed (never asserts).

Run from the repository root:

    .venv/bin/python bench/bench_parse.py [--corpus DIR] [--repeat N]

Candidates: ``email`` compat32 (bare parse, and with every leaf's transfer
encoding undone), ``email`` with ``policy.default`` (parse, read the address
headers, ``get_content()`` of every leaf), flanker 0.9.11 (``from_string``
and every leaf body), and ``ingest.parse.parse_message`` (our whole parse +
normalise stage). Timings use process CPU time (the machine is shared),
best of ``--repeat`` runs.

"Lost fields" counts, over messages every candidate parsed, those where a
candidate finds fewer leaf parts, no From address, or no Subject when
another candidate finds them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import mailbox
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.parse import PARSE_FAILED, parse_message
from ingest.types import ParsedMessage

Facts = tuple[int, bool, bool]  # leaf parts, has From address, has Subject


@dataclass(frozen=True, slots=True)
class Candidate:
    """One parser under test: a timed call and a field extractor."""

    name: str
    run: Callable[[bytes], object]
    facts: Callable[[bytes], Facts] | None


def _default_corpus() -> Path:
    configured = os.environ.get("MAILGATE_CORPUS")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def load_corpus(root: Path) -> list[tuple[str, bytes]]:
    """Return (id, raw) for every *.eml under mime/ and every mbox message."""
    found = [
        (p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.glob("mime/**/*.eml"))
    ]
    mboxes = sorted((root / "threads").glob("*.mbox")) + sorted((root / "mime").rglob("*.mbox*"))
    for path in mboxes:
        box = mailbox.mbox(str(path), create=False)
        for index, key in enumerate(box.iterkeys()):
            found.append((f"{path.relative_to(root).as_posix()}#{index}", box.get_bytes(key)))
        box.close()
    return found


def _leaves(msg: Message) -> list[Message]:
    """Leaf parts, not descending into message/* parts (each counts as one leaf)."""
    if msg.get_content_maintype() == "message" or not msg.is_multipart():
        return [msg]
    out: list[Message] = []
    for child in msg.get_payload():
        if isinstance(child, Message):
            out.extend(_leaves(child))
    return out


def run_compat32(raw: bytes) -> object:
    return BytesParser(policy=policy.compat32).parsebytes(raw)


def run_compat32_decoded(raw: bytes) -> object:
    msg = BytesParser(policy=policy.compat32).parsebytes(raw)
    for part in _leaves(msg):
        part.get_payload(decode=True)
    return msg


def facts_compat32(raw: bytes) -> Facts:
    from email.utils import getaddresses

    msg = BytesParser(policy=policy.compat32).parsebytes(raw)
    addresses = [a for _, a in getaddresses([str(v) for v in msg.get_all("from", [])]) if a]
    return len(_leaves(msg)), bool(addresses), bool(str(msg.get("subject", "")).strip())


def run_default(raw: bytes) -> object:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    for name in ("from", "to", "cc", "subject", "message-id"):
        msg.get(name)
    for part in _leaves(msg):
        if part.get_content_maintype() != "message":
            part.get_content()  # type: ignore[attr-defined]
    return msg


def facts_default(raw: bytes) -> Facts:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    sender = msg.get("from")
    has_from = bool(sender is not None and getattr(sender, "addresses", ()))
    return len(_leaves(msg)), has_from, bool(str(msg.get("subject", "")).strip())


def _flanker_leaves(part: object) -> int:
    ctype = part.content_type  # type: ignore[attr-defined]
    if ctype.is_multipart():
        return sum(_flanker_leaves(p) for p in part.parts)  # type: ignore[attr-defined]
    return 1


def run_flanker(raw: bytes) -> object:
    from flanker import mime

    msg = mime.from_string(raw)
    for part in msg.walk(with_self=True):
        if not part.content_type.is_multipart():
            part.body  # noqa: B018 - forces decoding
    return msg


def facts_flanker(raw: bytes) -> Facts:
    from flanker import mime
    from flanker.addresslib import address

    msg = mime.from_string(raw)
    sender = msg.headers.get("From") or ""
    has_from = bool(address.parse_list(sender))
    return _flanker_leaves(msg), has_from, bool((msg.subject or "").strip())


def run_ours(raw: bytes) -> object:
    return parse_message(raw)


def facts_ours(raw: bytes) -> Facts:
    parsed = parse_message(raw)
    leaves = (
        len(parsed.attachments) + (parsed.text_body is not None) + (parsed.html_body is not None)
    )
    return leaves, bool(parsed.participants.from_), bool(parsed.subject.strip())


CANDIDATES = (
    Candidate("email compat32 (bare parse)", run_compat32, facts_compat32),
    Candidate("email compat32 + decode leaves", run_compat32_decoded, None),
    Candidate("email policy.default", run_default, facts_default),
    Candidate("flanker 0.9.11", run_flanker, facts_flanker),
    Candidate("ingest.parse_message", run_ours, facts_ours),
)


def time_candidate(
    cand: Candidate, corpus: list[tuple[str, bytes]], repeat: int
) -> tuple[float, list[str], tuple[float, str]]:
    """Return (best CPU seconds, failing ids, (slowest seconds, id))."""
    best = float("inf")
    failures: list[str] = []
    slowest = (0.0, "")
    for _ in range(repeat):
        failures = []
        start = time.process_time()
        for name, raw in corpus:
            t0 = time.process_time()
            try:
                result = cand.run(raw)
            except Exception as exc:
                failures.append(f"{name} ({type(exc).__name__})")
                continue
            if isinstance(result, ParsedMessage) and any(
                d.kind == PARSE_FAILED for d in result.defects
            ):
                failures.append(f"{name} (parse_failed defect)")
            spent = time.process_time() - t0
            slowest = max(slowest, (spent, name))
        best = min(best, time.process_time() - start)
    return best, failures, slowest


def lost_fields(corpus: list[tuple[str, bytes]]) -> dict[str, list[str]]:
    """Per candidate, ids where it found less than the best other candidate."""
    with_facts = [c for c in CANDIDATES if c.facts is not None]
    lost: dict[str, list[str]] = {c.name: [] for c in with_facts}
    for name, raw in corpus:
        facts: dict[str, Facts] = {}
        try:
            for cand in with_facts:
                assert cand.facts is not None
                facts[cand.name] = cand.facts(raw)
        except Exception:  # noqa: S112 - only compare where all parsed
            continue
        best = tuple(max(f[i] for f in facts.values()) for i in range(3))
        for cand_name, found in facts.items():
            missing = [
                label
                for label, have, top in zip(("parts", "from", "subject"), found, best, strict=True)
                if have < top
            ]
            if missing:
                lost[cand_name].append(f"{name} ({','.join(missing)})")
    return lost


def main() -> None:
    """Print the figures for docs/parser.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=_default_corpus())
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--show", type=int, default=5, help="failing/lost ids to list per parser")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # flanker logs every malformed header
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # ply prints grammar warnings when flanker is first imported.
        import flanker.addresslib.address
        import flanker.mime  # noqa: F401
    corpus = load_corpus(args.corpus)
    total_mb = sum(len(raw) for _, raw in corpus) / 1e6
    version = sys.version.split()[0]
    print(
        f"corpus: {args.corpus}  messages: {len(corpus)}  size: {total_mb:.1f} MB  python {version}"
    )
    seconds: dict[str, float] = {}
    for cand in CANDIDATES:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            spent, failures, slowest = time_candidate(cand, corpus, args.repeat)
        seconds[cand.name] = spent
        print(
            f"{cand.name:34s} {len(corpus) / spent:7.0f} msg/s {total_mb / spent:6.1f} MB/s  "
            f"failures {len(failures):3d}  slowest {slowest[0] * 1000:6.1f} ms {slowest[1]}"
        )
        for line in failures[: args.show]:
            print(f"    failed: {line}")
    ratio = seconds["email compat32 (bare parse)"] / seconds["ingest.parse_message"]
    print(f"parse_message speed / bare compat32 parse: {ratio:.2f}")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        lost = lost_fields(corpus)
    for name, ids in lost.items():
        print(f"lost fields vs best other: {name:30s} {len(ids):4d} messages")
        for line in ids[: args.show]:
            print(f"    {line}")


if __name__ == "__main__":
    main()
