"""Model sync: follow the hub's desired state with verified, checked model versions.

- ``sync``: the desired-state handler: what to serve, startup from the cache, status and state.
- ``switch``: one version switched into its slot, its probation, and the switch back.
- ``targets``: which version to serve and where its files come from (hub or config).
- ``cache``: the local cache of verified versions (kept for rollbacks and restarts).
- ``fetch``: resumable, bounded downloads of artifacts from the hub.
- ``check``: shadow load and validation before a version may serve a frame.
- ``shadow``: a candidate named in ``shadow`` loaded beside the active version, never serving.
"""
