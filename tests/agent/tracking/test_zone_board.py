"""Retained zone occupancy through a real MQTT link to a real Mosquitto (the board's clock
injected): a change goes out at once, changes within ``min_interval_s`` coalesce to the latest,
a count that comes back to the published one sends nothing, a stop sends what is pending."""

from __future__ import annotations

from edge_agent.config import MqttSettings
from edge_agent.contract import events as wire
from edge_agent.tracking.zones_out import ZoneBoard
from edge_agent.transport.link import MqttLink
from tests.support.broker import Broker
from tests.support.mqtt_recorder import Recorder

NODE, CAM = "node-zb", "cam0"


def _zone(labels: dict[str, int]) -> dict[str, object]:
    return wire.build_zone(node=NODE, camera=CAM, zone="door", ts=1.0, labels=labels)


async def test_occupancy_is_published_on_change_at_most_once_per_interval(
    broker: Broker, topic_prefix: str
) -> None:
    link = MqttLink(MqttSettings(**broker.settings(NODE), topic_prefix=topic_prefix), NODE)
    rec = Recorder(broker, [wire.zones_filter(topic_prefix)]).start()
    now = [100.0]
    board = ZoneBoard(link, prefix=topic_prefix, node=NODE, refresh_s=3600.0,
                      min_interval_s=1.0, connects=lambda: 1, clock=lambda: now[0])

    def counts() -> list[dict[str, int]]:
        return [wire.decode_zone(p).labels for _, p, _ in list(rec.messages)]

    await link.start()
    try:
        assert await link.wait_connected(10)
        board.set(CAM, "door", _zone({}))
        assert board.flush() == 1  # the first value at once
        now[0] += 0.2
        board.set(CAM, "door", _zone({"person": 1}))
        now[0] += 0.2
        assert board.flush() == 0  # 0.4 s after the last one: held
        board.set(CAM, "door", _zone({"person": 2}))
        now[0] += 0.7
        assert board.flush() == 1  # 1.1 s: the latest of the two
        now[0] += 0.3
        board.set(CAM, "door", _zone({"person": 3}))
        board.set(CAM, "door", _zone({"person": 2}))
        now[0] += 2.0
        assert board.flush() == 0  # back at the published count: nothing to say
        board.set(CAM, "door", _zone({}))
        now[0] += 0.1
        assert board.flush() == 1  # over a second since the last: at once
        board.set(CAM, "door", _zone({"car": 1}))
        assert board.flush() == 0
        assert board.flush(final=True) == 1  # a stop: the pending change goes out
        rec.wait(lambda: len(counts()) >= 4, 10, "four occupancy messages")
        assert counts() == [{}, {"person": 2}, {}, {"car": 1}]
        assert board.published == 4
    finally:
        rec.stop()
        await link.aclose()
