"""Fixtures of the capture tests: cameras that are stopped and joined after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge_agent.capture.camera import Camera


@pytest.fixture
def cameras() -> Iterator[list[Camera]]:
    """The test appends the cameras it starts; each is stopped and must end within 15 s."""
    made: list[Camera] = []
    yield made
    for c in made:
        c.stop()
    for c in made:
        assert c.join(15), f"camera {c.name} did not stop"
