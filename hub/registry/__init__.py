"""The model registry: immutable, verified model versions kept by sha256.

- ``service``: ``Registry``, the push/get/list/delete rules.
- ``metadata``: ``ModelVersion`` rows and the metadata store (SQLite).
- ``artifacts``: the content-addressed blob store.
- ``validation``: what a pushed model must pass (the agent's own contract checks).
- ``signing``: ed25519 signatures over artifacts.
"""
