"""The hub server as one program: composition and lifecycle.

- ``app``: the composition root; builds every part, wires them through their constructors and
  runs the aiohttp application.
- ``control``: the rollout side assembled (cluster, MQTT, fleet, desired state, rollouts), its
  start and stop, and the answers to the API's queries.
- ``metrics``: the fleet and the rollouts on ``/metrics``.
"""
