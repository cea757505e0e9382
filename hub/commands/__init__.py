"""The ``edge-hub`` verbs, one module each with ``register(subparsers)``.

- ``serve``: run the hub.
- ``models``: push, list, show, pull, rm model versions.
- ``rollout``: start, status, pause, resume, promote, abort, rollback.
- ``nodes``: the fleet as the hub sees it.
- ``results``: tail the agents' results, de-duplicated, with gaps.
- ``keygen``: an ed25519 key pair for signing.
- ``pki``: the CA (``init``) and certificates for agents, consumers, the hub, servers (``issue``).
"""
