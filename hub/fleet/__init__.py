"""The fleet as the agents report it: per node and per model version telemetry and state.

- ``view``: ``Fleet``, kept from MQTT ``state`` and ``telemetry``.
- ``aggregate``: ``Metrics`` (one node's or a group's figures over a window) from samples.
"""
