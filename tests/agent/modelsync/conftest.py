"""Fixtures of the model-sync tests: a real HTTP file server standing in for the hub's downloads."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import fileserver
from tests.support.fileserver import FileServer


@pytest.fixture
async def server() -> AsyncIterator[FileServer]:
    """A real aiohttp file server on a free loopback port, with injectable faults."""
    async with fileserver.running() as s:
        yield s
