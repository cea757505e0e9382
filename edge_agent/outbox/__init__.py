"""The durable store-and-forward outbox: the ``ResultSink`` that loses nothing it accepted.

- ``facade``: ``Outbox``, the one entry point (publish, claim/ack for the drain, observation);
  it builds the parts below and the state they share.
- ``store``: the commit side: what a commit round does to the SQLite file (bounds, drop
  policy, ENOSPC, corruption), and reading claimed rows.
- ``seq``: per-camera sequence numbers, given at commit in the transaction that stores the row
  (contiguous across restarts), and the reset marker of a new series.
- ``state``: ``Shared``, what the hot path, the commit thread and the drain share (one lock),
  with who writes each field. Passed to the parts; none of them knows the façade.
- ``db``: the SQLite file: schema, pragmas and statements.
"""
