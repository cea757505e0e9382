"""The hub server as one program: composition and lifecycle.

- ``app``: builds the aiohttp application and runs it.
- ``control``: the rollout side assembled (cluster, MQTT, fleet, desired state, rollouts).
- ``metrics``: the fleet and the rollouts on ``/metrics``.
"""
