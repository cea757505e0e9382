"""Objects across frames: tracks, zones, lines and the events subscribers script against.

A result per frame says what is in that frame; this package turns a camera's results into
tracked objects (``tracker``: norfair behind stable, never reused ids), follows each through the
camera's zones and over its lines (``scene``), and decides what is news (``camera``: ``new``,
throttled ``update``, ``end``; zone occupancy). ``sink`` sits where results reach the result
sink: it feeds each camera's results to its tracks, forwards the results themselves only for
cameras that publish frames, and queues events on the durable outbox with their own seq series
and the open tracks as the outbox's per-stream state, so a restarted agent closes every track
its predecessor left open (``end``, reason ``restart``). ``zones_out`` keeps the retained
occupancy topics current; ``snapshots`` keeps each open track's best crop and makes its JPEG
when it ends; ``kalman`` is norfair's filter specialised to whole boxes. Wire format:
``edge_agent.contract.events`` and ``edge_agent.contract.snapshots``; docs/events.md.

Layering: at the streaming level; it imports the contract, the settings and the shared
plumbing only. The outbox and the MQTT link reach it through small protocols
(``sink.EventOutbox``, ``zones_out.RetainedLink``) wired by ``edge_agent.app.compose``.
"""
