"""Fixtures of the rollout tests: a fake Kubernetes API and a fleet of simulated agents."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.rollout_env import Fleet


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    """The fake Kubernetes API server (the real client talks to it) with no nodes yet."""
    k = FakeKube(hang_s=10).start()
    yield k
    k.stop()


@pytest.fixture
def fleet(broker: Broker, topic_prefix: str) -> Iterator[Fleet]:
    """Simulated agents on the shared broker under the test's own topic prefix."""
    f = Fleet(broker, topic_prefix)
    yield f
    f.stop()
