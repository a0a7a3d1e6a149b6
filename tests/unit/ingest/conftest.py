"""Corpus helpers for the ingest unit tests: where the corpus is, every message in it.

The corpus is ``shared/corpus`` beside the repository (a clone at ``/tmp/x``
uses ``/tmp/shared/corpus``), or the directory named by ``MAILGATE_CORPUS``.
A missing corpus makes the corpus tests FAIL with a clear message: a green
run without the real data would be a fake of success.

Test ids are the path relative to the corpus root, plus ``#index`` (0-based,
``mailbox.mbox`` order) for messages inside an mbox file.
"""

from __future__ import annotations

import mailbox
import os
from functools import cache
from pathlib import Path

import pytest

CORPUS_ENV = "MAILGATE_CORPUS"
MISSING_CORPUS_ID = "corpus-missing"


def corpus_root() -> Path:
    """Return the corpus directory (it may not exist)."""
    configured = os.environ.get(CORPUS_ENV)
    if configured:
        return Path(configured).resolve()
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "corpus"


def corpus_missing_message() -> str | None:
    """Return why the corpus cannot be used, or None when it is there."""
    root = corpus_root()
    if (root / "mime").is_dir() and (root / "threads").is_dir():
        return None
    return (
        f"mail corpus not found at {root} (needs mime/ and threads/); clone the repo next "
        f"to shared/ or set {CORPUS_ENV}=/path/to/shared/corpus"
    )


def mbox_paths(root: Path) -> list[Path]:
    """Return every mbox file: threads/*.mbox and mime/**/*.mbox*, sorted."""
    mboxes = sorted((root / "threads").glob("*.mbox")) + sorted((root / "mime").rglob("*.mbox*"))
    return [p for p in mboxes if p.is_file()]


def read_mbox(path: Path) -> list[bytes]:
    """Return the raw bytes of each message of an mbox, in file order."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return [box.get_bytes(key) for key in box.iterkeys()]
    finally:
        box.close()


@cache
def corpus_messages() -> dict[str, bytes]:
    """Return every corpus message by test id: mime/**/*.eml, then mbox messages.

    Returns:
        An insertion-ordered dict: id -> raw bytes; empty if the corpus is missing.
    """
    root = corpus_root()
    if corpus_missing_message() is not None:
        return {}
    found: dict[str, bytes] = {}
    for path in sorted((root / "mime").rglob("*.eml")):
        found[path.relative_to(root).as_posix()] = path.read_bytes()
    for path in mbox_paths(root):
        relative = path.relative_to(root).as_posix()
        for index, raw in enumerate(read_mbox(path)):
            found[f"{relative}#{index}"] = raw
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``corpus_message`` over every corpus message (ids as above)."""
    if "corpus_message" in metafunc.fixturenames:
        ids = list(corpus_messages()) or [MISSING_CORPUS_ID]
        metafunc.parametrize("corpus_message", ids, indirect=True)


@pytest.fixture
def corpus_message(request: pytest.FixtureRequest) -> tuple[str, bytes]:
    """Return (test id, raw bytes) of one corpus message; fail if no corpus."""
    reason = corpus_missing_message()
    if reason is not None or request.param == MISSING_CORPUS_ID:
        pytest.fail(reason or "corpus is empty")
    return request.param, corpus_messages()[request.param]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Return the corpus root; fail (not skip) when it is missing."""
    reason = corpus_missing_message()
    if reason is not None:
        pytest.fail(reason)
    return corpus_root()
