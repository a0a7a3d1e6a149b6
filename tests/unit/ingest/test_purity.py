"""The ingest package stays pure: no clock reads, no randomness, no printing.

import-linter (run by ./run test) forbids I/O, database, asyncio and logging
imports; this test catches what an import contract cannot see: calls of the
clock or of random sources from otherwise allowed modules.
"""

from __future__ import annotations

import re
from pathlib import Path

INGEST = Path(__file__).resolve().parents[3] / "ingest"
FORBIDDEN = re.compile(
    r"\b(datetime\.now|datetime\.utcnow|date\.today|time\.time|time\.monotonic"
    r"|random\.|secrets\.|uuid\.uuid[14]|print\(|open\()"
)


def test_ingest_reads_no_clock_and_does_no_io() -> None:
    offenders = []
    for path in sorted(INGEST.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code):
                offenders.append(f"{path.relative_to(INGEST.parent)}:{number}: {line.strip()}")
    assert len(list(INGEST.rglob("*.py"))) > 5
    assert offenders == []
