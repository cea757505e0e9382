"""The result message, built in one place for every producer of results.

``protocol.ResultMessage`` is the schema subscribers read; this module builds the payload. The
per-frame path cannot afford a pydantic model per frame, so a result is a plain dict in exactly
the ``ResultMessage`` shape, and the scheduler's workers, ``edge-agent batch`` and the HTTP
upload endpoint all build it here, so the three can never drift apart. Key order is the order
``docs/protocol.md`` shows (orjson keeps insertion order); ``seq`` is not set here: the sink
assigns it. The durable outbox assigns it only when the result is committed, to bytes that were
serialized earlier: ``with_seq`` appends ``seq`` (and, on the first result of a new series, the
``seq_reset`` marker) as the last fields of the serialized object, so that wire format is
defined here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from edge_agent.contract.protocol import PROTOCOL_VERSION, SEQ_RESET_REASONS

#: The ``latency_ms`` stages, in the order they appear on the wire.
STAGES = ("capture_to_start", "preprocess", "inference", "postprocess", "end_to_end")

#: Bytes ``with_seq`` adds without a marker, for seqs below 10^16 (``,"seq":`` + 16 digits;
#: a seq started from the wall clock in microseconds has 16 digits until the year 2286).
SEQ_FIELD_BYTES = 23


def with_seq(body: bytes, seq: int, reset: tuple[int, str] | None = None) -> bytes:
    """``body`` (a serialized result object without ``seq``) with ``seq`` as its last field.

    ``reset`` = (first seq of the series, reason) adds the ``seq_reset`` marker after it. The
    reason must be one of ``protocol.SEQ_RESET_REASONS`` (it is written without escaping).
    Runs on the outbox's commit thread for every row: bytes only, no parsing (~0.5 us).
    """
    if reset is None:
        return body[:-1] + b',"seq":%d}' % seq
    first, reason = reset
    if reason not in SEQ_RESET_REASONS:
        raise ValueError(f"unknown seq reset reason {reason!r}")
    return b'%b,"seq":%d,"seq_reset":{"first":%d,"reason":"%b"}}' % (
        body[:-1], seq, first, reason.encode())


class ResultModel(Protocol):
    """What a result says about the model that produced it (a loaded model has these)."""

    @property
    def name(self) -> str:
        """The model name."""
        ...

    @property
    def version(self) -> str:
        """The model version."""
        ...

    @property
    def task(self) -> str:
        """The post-processing task (``yolo``, ``classification``, ...)."""
        ...


def latencies(
    *,
    preprocess: float,
    inference: float,
    postprocess: float,
    capture_to_start: float | None = None,
    end_to_end: float | None = None,
) -> dict[str, float]:
    """Per-stage latencies in milliseconds, rounded to microseconds, in wire order.

    A stage passed as None is left out: an uploaded image has no capture and no sink, so
    ``POST /v1/infer`` reports only the three stages it ran.
    """
    out: dict[str, float] = {}
    if capture_to_start is not None:
        out["capture_to_start"] = round(capture_to_start, 3)
    out["preprocess"] = round(preprocess, 3)
    out["inference"] = round(inference, 3)
    out["postprocess"] = round(postprocess, 3)
    if end_to_end is not None:
        out["end_to_end"] = round(end_to_end, 3)
    return out


def build_result(
    *,
    node: str,
    camera: str | None,
    ts: float,
    model: ResultModel,
    width: int,
    height: int,
    latency_ms: dict[str, float],
    output: Mapping[str, Any],
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One result payload: ``output`` is the task's part (``detections`` or ``classes``).

    ``camera`` is None only for an uploaded image (``POST /v1/infer``), which belongs to no
    stream; ``source`` (``edge-agent batch``) says which file and frame a result came from.
    ``latency_ms`` stays the caller's dict (the relay stamps ``end_to_end`` into it later).
    """
    res: dict[str, Any] = {"v": PROTOCOL_VERSION, "node": node}
    if camera is not None:
        res["camera"] = camera
    res["ts"] = ts
    res["model"] = {"name": model.name, "version": model.version}
    res["task"] = model.task
    res["frame"] = {"width": width, "height": height}
    res["latency_ms"] = latency_ms
    if source is not None:
        res["source"] = dict(source)
    res.update(output)
    return res
