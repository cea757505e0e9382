"""Model sync: follow the hub's desired state with verified, checked model versions.

- ``sync``: the desired-state handler, the switch and the switch-back.
- ``cache``: the local cache of verified versions (kept for rollbacks and restarts).
- ``fetch``: resumable, bounded downloads of artifacts from the hub.
- ``check``: shadow load and validation before a version may serve a frame.
"""
