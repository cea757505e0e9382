"""Transport: the agent's MQTT link and what travels over it.

- ``link``: ``MqttLink``, the one paho-mqtt client bridged to asyncio.
- ``drain``: committed outbox rows to MQTT at QoS 1, deleted on PUBACK.
- ``telemetry``: the periodic telemetry publisher.
- ``metrics``: Prometheus metrics of the outbox, the drain and the link, read at scrape time.
"""
