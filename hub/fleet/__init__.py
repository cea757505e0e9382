"""The fleet as the agents report it: per node and per model version telemetry and state.

- ``view``: ``Fleet``, kept from MQTT ``state`` and ``telemetry``.
"""
