"""Fixtures of the agent's tests beyond the shared ones in ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, for tests that kill and restart it."""
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
