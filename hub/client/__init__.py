"""Code that talks to a hub and a broker from outside: what the CLI verbs and consumers use.

It never imports server internals.

- ``http``: the asyncio HTTP client of the hub's API, and ``add_client_verb`` for the CLI
  verbs that use it.
- ``output``: tables, JSON and progress bars for the terminal.
- ``results``: a de-duplicating results subscriber that reports gaps and resets apart.
- ``events``: the same for track events, with label and zone filters and zone occupancy.
- ``stream``: the MQTT subscriber both are made of (``SeqSubscriber``).
- ``seqs``: its per-stream seq bookkeeping (``Deduplicator``), usable without MQTT.
"""
