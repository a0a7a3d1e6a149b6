"""The whole prepare() stage over every corpus message: never raises, stable.

Whole-corpus invariants of STYLE.md §10 that span stages: the pipeline's
``prepare`` (parse → normalise → identity → thread links → forward) runs on
every real message, gives the same result on a second run, and asks storage
for exactly the ids and addresses the message names.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from ingest.pipeline import prepare
from ingest.types import RawMessage, SmtpEnvelope

ENVELOPE = SmtpEnvelope(
    envelope_sender="user@example.com",
    envelope_recipients=("U-AAAAAAAAAAAAAAAAAAAA@bcc.example.test",),
    peer="127.0.0.1",
    helo="test",
    received_at=datetime(2026, 1, 1, tzinfo=UTC),
)


def raw_message(data: bytes) -> RawMessage:
    return RawMessage(raw=data, provenance=ENVELOPE, sha256=hashlib.sha256(data).hexdigest())


def test_r12_prepare_every_corpus_message_is_stable(corpus_message: tuple[str, bytes]) -> None:
    _, data = corpus_message
    first = prepare(raw_message(data))
    again = prepare(raw_message(data))
    assert first.identity == again.identity
    assert first.links == again.links
    assert first.lookups == again.lookups
    lookups = first.lookups
    assert lookups.identity_key == first.identity.key
    assert set(first.links.ancestors) <= lookups.message_ids
    if first.parsed.message_id is not None:
        assert first.parsed.message_id in lookups.message_ids
        assert first.parsed.message_id not in first.links.ancestors
    participant_keys = {p.address.address_key for p in first.parsed.participants.all()}
    assert participant_keys <= lookups.address_keys
    assert lookups.sync_addresses == frozenset({"u-aaaaaaaaaaaaaaaaaaaa@bcc.example.test"})
