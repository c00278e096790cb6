"""A throwaway PostgreSQL server on loopback for the distributed-search tests
(:func:`neuromerge.search.local_postgres.throwaway_postgres`). A missing server binary is a test failure
(``make test`` installs Debian's postgresql package), not a skip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from neuromerge.errors import NeuromergeError
from neuromerge.search.local_postgres import server_binaries, throwaway_postgres


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:<port>/neuromerge_search`` of a fresh server, stopped afterwards."""
    try:
        server_binaries()
    except NeuromergeError as e:
        pytest.fail(str(e))
    with throwaway_postgres() as url:
        yield url
