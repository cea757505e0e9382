"""A de-duplicating subscriber for the agents' results, for consumers' own code and the CLI.

Results travel at least once (DESIGN.md): after a broker outage or an agent restart the outbox
re-sends what the broker never acknowledged, so a subscriber sees some results twice. Every
consumer has to drop those by the key (node, camera, seq), and most also want to know when results
went missing (an outbox that dropped under its disk budget, a consumer that was away). This module
does both once, so downstream code only sees each result once, in arrival order. The machinery
is shared with the events consumer (``hub.client.stream.SeqSubscriber``); this module adds the
results' topic filter and decoder.

Design:

- paho-mqtt 2.x in its own network thread (the shared client base, ``edge_agent.common.mqtt``:
  login, TLS, jittered reconnect); the callback only appends the raw message to a queue.
  Parsing (``protocol.decode_result``), de-duplication, gap detection and the PUBACK all happen in
  the consumer's thread, in ``get()``. Acknowledging only when the consumer takes a result
  (``manual_ack``) together with MQTT 5 *Receive Maximum* makes the broker hold back instead of
  flooding a slow consumer, and acknowledgements go out in the order messages came in.
- Per (node, camera) stream it keeps the highest seq seen, the newest frame timestamp, the
  first seq of the current series when known, and the ranges of seqs still missing. The agent
  numbers a camera's committed results without holes, across its restarts, so a seq above the
  highest + 1 opens a gap: results were lost. A missing seq that arrives later is delivered
  (``late``); any other seq at or below the highest is a duplicate.
- A reset is not a loss: when an agent's outbox file was replaced (deleted, lost, moved aside as
  corrupt) its camera starts a new series, and the first result of it carries ``seq_reset``
  (the series' first seq and why). A marker for a series other than the stream's current one
  restarts the stream there (``on_reset``), with a gap only for the new series' own seqs that
  are missing. Without a marker (an older agent), a seq at or below the highest whose frame
  time is newer than anything seen on the stream is taken as a reset too (a duplicate is a copy
  of a result already seen, so it can never carry a newer timestamp).
- With a group, it subscribes with an MQTT 5 shared subscription ``$share/{group}/{filter}`` so
  several consumers split the load. The broker hands each message to one member, so members see
  interleaved subsets of each stream: gap reporting is off in a group (every member would see
  "gaps" that its peers received), and a redelivery may land on another member, so exactly-once
  across the group needs the key downstream too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from edge_agent.contract.protocol import (
    DEFAULT_TOPIC_PREFIX,
    ProtocolError,
    ResultMessage,
    decode_result,
    parse_topic,
    results_filter,
)
from hub.client import stream
from hub.client.seqs import Deduplicator, Gap, Reset
from hub.client.stream import SubscriberStats


class ResultsUnavailableError(stream.BrokerUnavailableError):
    """The broker could not be reached, refused the login, or refused the subscription.

    Exit 3 as the hub client's "unreachable": scripts tell "no broker" from "no results" (1).
    """


class Received(stream.Delivered[ResultMessage]):
    """One de-duplicated result: the parsed message, its topic and the payload as sent."""


_log_gap = stream.gap_logger("results")
_log_reset = stream.reset_logger("results")


class ResultSubscriber(stream.SeqSubscriber[Received]):
    """Subscribe to results, drop duplicates, report gaps. Use as a context manager.

    ``node`` / ``camera`` narrow the subscription (MQTT wildcards otherwise). ``group`` makes it a
    shared subscription so consumers in the same group split the messages. ``on_gap`` and
    ``on_reset`` are called in the consumer's thread, in order with the results (default: a
    ``results_gap`` / ``results_stream_reset`` warning); a reset is never reported as a gap.
    ``receive_maximum`` bounds the results the broker sends before the consumer takes them.
    ``session_expiry_s`` > 0 with a fixed ``client_id`` keeps the broker session across restarts
    (results queued while away are delivered on return). TLS by default: ``ca_file`` verifies
    the broker, ``cert_file``/``key_file`` are the consumer's own identity (a ``consumer:...``
    certificate, docs/security.md).
    """

    kind = "results"
    unavailable = ResultsUnavailableError

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8883,
        *,
        topic_prefix: str = DEFAULT_TOPIC_PREFIX,
        node: str | None = None,
        camera: str | None = None,
        group: str | None = None,
        username: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
        tls: bool = True,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        client_id: str = "",
        protocol: int = 5,
        keepalive_s: int = 15,
        receive_maximum: int = 1000,
        session_expiry_s: int = 0,
        max_queue: int = 100_000,
        on_gap: Callable[[Gap], None] | None = _log_gap,
        on_reset: Callable[[Reset], None] | None = _log_reset,
    ) -> None:
        super().__init__(
            host, port, filters=[results_filter(topic_prefix, node or "+", camera or "+")],
            group=group, username=username, password=password, password_file=password_file,
            tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            client_id=client_id, protocol=protocol, keepalive_s=keepalive_s,
            receive_maximum=receive_maximum, session_expiry_s=session_expiry_s,
            max_queue=max_queue, on_gap=on_gap, on_reset=on_reset,
        )
        self.prefix = topic_prefix

    def _decode(self, raw: stream.Raw) -> Received:
        msg = decode_result(raw.payload)
        node, kind, camera = parse_topic(self.prefix, raw.topic)
        if kind != "results" or (node, camera) != (msg.node, msg.camera):
            raise ProtocolError(f"payload names {msg.node}/{msg.camera} but came on {raw.topic!r}")
        return Received(raw.topic, raw.payload, msg)

    def _key(self, item: Received) -> stream.SeqKey:
        m = item.message
        mark = m.seq_reset
        return stream.SeqKey(m.node, m.camera, m.seq, m.ts,
                             None if mark is None else mark.first,
                             None if mark is None else mark.reason)

    def _flag(self, item: Received, *, late: bool, reset: bool) -> Received:
        return dataclasses.replace(item, late=late, reset=reset)


__all__ = ["Deduplicator", "Gap", "Received", "Reset", "ResultSubscriber",
           "ResultsUnavailableError", "SubscriberStats"]
