"""Fixtures of the agent's tests beyond the shared ones in ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.pki import TestPki


@pytest.fixture
def own_broker(tmp_path: Path, pki: TestPki) -> Iterator[Broker]:
    """A broker of the test's own (TLS, the session's CA), for tests that kill and restart it."""
    b = Broker(tmp_path, pki=pki)
    b.start()
    yield b
    b.stop()
