"""Attacks on the events and zones topics (issue 15) with a stolen node certificate and a
consumer's: against the session broker with the production ACL (``contract.acl``).

- node-a's certificate cannot publish node-b's events, nor a retained occupancy for node-b's
  zones (which would stay on the broker for every new subscriber), nor node-b's snapshots,
  nor topics outside the three shapes (``events/{camera}``, ``zones/{camera}/{zone}``,
  ``snapshots/{camera}``) under its own name; its own events, retained zone occupancy and
  snapshots go through.
- a consumer's certificate reads events, zones and snapshots but cannot write them.
"""

from __future__ import annotations

import pytest

from edge_agent.config import MqttSettings
from edge_agent.contract import events as wire
from edge_agent.contract import snapshots as snaps
from edge_agent.transport.link import MqttLink
from tests.support.broker import CONSUMER, Broker
from tests.support.mqtt_recorder import Recorder
from tests.support.waiting import until

NOT_AUTHORISED = 0x87


async def _codes(broker: Broker, identity: str, prefix: str, topics: list[str],
                 *, retain: bool, payload: bytes = b'{"forged": true}') -> dict[str, int]:
    link = MqttLink(MqttSettings(**broker.settings(identity), topic_prefix=prefix), "node-a")
    await link.start()
    codes: dict[str, int] = {}
    try:
        assert await link.wait_connected(10)
        for topic in topics:
            assert link.publish(topic, payload, retain=retain, token=topic,
                                on_ack=codes.__setitem__)
        await until(lambda: len(codes) == len(topics), what="every PUBACK")
    finally:
        await link.aclose()
    return codes


@pytest.mark.parametrize("retain", [False, True])
async def test_a_node_publishes_only_its_own_events_and_zones(
    broker: Broker, topic_prefix: str, retain: bool
) -> None:
    p = topic_prefix
    rec = Recorder(broker, [f"{p}/#"]).start()
    forged = [wire.events_topic(p, "node-b", "cam0"), wire.zone_topic(p, "node-b", "cam0", "door"),
              f"{p}/node-a/events/cam0/extra", f"{p}/node-a/zones/cam0",
              f"{p}/node-a/zones/cam0/door/extra", f"{p}/node-a/events",
              snaps.snapshots_topic(p, "node-b", "cam0"), f"{p}/node-a/snapshots/cam0/1"]
    own = [wire.events_topic(p, "node-a", "cam0"), wire.zone_topic(p, "node-a", "cam0", "door"),
           snaps.snapshots_topic(p, "node-a", "cam0")]
    try:
        codes = await _codes(broker, "node-a", p, [*forged, *own], retain=retain)
        assert {t: codes[t] for t in forged} == {t: NOT_AUTHORISED for t in forged}
        assert {t: codes[t] for t in own} == {t: 0 for t in own}
        def arrived() -> set[str]:  # the link's own state message left out
            return {t for t, _, _ in list(rec.messages) if not t.endswith("/state")}

        rec.wait(lambda: arrived() >= set(own), 10, "own topics")
        assert arrived() == set(own)
    finally:
        rec.stop()
        if retain:  # an empty retained message clears what the run left on the broker
            await _codes(broker, "node-a", p, own, retain=True, payload=b"")


async def test_a_consumer_reads_but_cannot_write_events_or_zones(
    broker: Broker, topic_prefix: str
) -> None:
    p = topic_prefix
    topics = [wire.events_topic(p, "node-a", "cam0"), wire.zone_topic(p, "node-a", "cam0", "z"),
              snaps.snapshots_topic(p, "node-a", "cam0")]
    codes = await _codes(broker, CONSUMER, p, topics, retain=True)
    assert codes == {t: NOT_AUTHORISED for t in topics}
