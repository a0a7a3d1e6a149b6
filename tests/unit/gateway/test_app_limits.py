"""serve's start-up claims the hard open-files limit (2 IMAP connections per mailbox)."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from gateway.app import raise_open_files_limit


@pytest.fixture
def lowered_limit() -> Iterator[tuple[int, int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low, hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_soft_open_files_limit_is_raised_to_the_hard_limit(
    lowered_limit: tuple[int, int],
) -> None:
    low, hard = lowered_limit
    new_soft = raise_open_files_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new_soft
    if hard == resource.RLIM_INFINITY:
        assert new_soft == low  # an unlimited hard limit is left to the administrator
    else:
        assert new_soft == hard > low
