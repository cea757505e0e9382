"""The hub's MQTT link.

- ``mqtt``: desired state out (retained), agents' state and telemetry in.
"""
