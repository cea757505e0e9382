"""Fixtures of the rollout tests: a fake Kubernetes API, a fleet of simulated agents, a registry
holding versions 1.0 and 2.0, and the hub's settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hub.config import HubSettings
from hub.registry.service import Registry
from tests.support.broker import Broker
from tests.support.fake_k8s import FakeKube
from tests.support.rollout_env import Fleet, hub_settings, push_version


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


@pytest.fixture
async def registry(tmp_path: Path, models_dir: Path) -> AsyncIterator[Registry]:
    """A registry (no broker) with versions 1.0 and 2.0 of the test model."""
    reg = Registry(hub_settings(tmp_path / "data", broker=None, prefix="x", inventory=tmp_path))
    for v in ("1.0", "2.0"):
        await push_version(reg, models_dir, v)
    yield reg
    await reg.aclose()


@pytest.fixture
def settings(tmp_path: Path, broker: Broker, topic_prefix: str, kube: FakeKube) -> HubSettings:
    """The hub under test: its own data folder and topics, the shared broker, the fake API."""
    return hub_settings(tmp_path / "data", broker=broker, prefix=topic_prefix,
                        kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig"))
