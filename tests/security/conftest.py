"""Fixtures of the attack tests: each test in this folder is an attack that must fail against
the real parts (Mosquitto with TLS, client certificates and the production ACL; the real hub;
real agents).

- ``test_mqtt_identity.py``: one node's certificate speaking or listening for another, forged
  state and telemetry against a rollout, payloads naming another node, bad generations, an
  agent without a hub taking desired state;
- ``test_bootstrap*.py``: the K3s certificate bootstrap, its credential kept apart from the
  API's (docs/security.md);
- ``test_http_*.py``: the hub's and the agent's HTTP servers (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.broker import Broker, Publishers


@pytest.fixture
def nodes(broker: Broker) -> Iterator[Publishers]:
    """Publish as whichever node a topic names, each with its own certificate: the attacker
    holds one box (its certificate and key) and uses it in every way the broker allows."""
    p = Publishers(broker)
    yield p
    p.close()
