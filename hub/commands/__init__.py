"""The ``edge-hub`` verbs, one module each with ``register(subparsers)``.

- ``serve``: run the hub.
- ``models``: push, list, show, pull, rm model versions; ``quantize`` (its own module) makes a
  measured INT8 version of one.
- ``rollout``: start, status, pause, resume, promote, abort, rollback.
- ``nodes``: the fleet as the hub sees it.
- ``db``: ``migrate``, a SQLite hub's state copied into PostgreSQL (before scaling out).
- ``results``: tail the agents' results, de-duplicated, with gaps.
- ``events``: tail the agents' track events and zone occupancy, filtered by label and zone.
- ``keygen``: an ed25519 key pair for signing.
- ``pki``: the CA (``init``) and certificates for agents, consumers, the hub, servers (``issue``).
"""
