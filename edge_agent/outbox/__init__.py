"""The durable store-and-forward outbox: the ``ResultSink`` that loses nothing it accepted.

- ``facade``: ``Outbox``, the one entry point (publish, claim/ack for the drain, observation).
- ``store``: what a commit round does to the SQLite file (bounds, drop policy, ENOSPC).
- ``seq``: per-camera sequence numbers reserved durably before use.
- ``db``: the SQLite file: schema, pragmas and statements.
"""
