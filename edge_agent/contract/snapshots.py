"""Track snapshots: a JPEG crop of a tracked object's best frame, as its own message.

Why a message of its own: an event says what happened to an object; a person looking at an
alert wants to see it. A camera with ``cameras[].snapshot.enabled`` (off by default; the
image leaves the site) sends, when a track ends (``lost`` or ``stopped``), one snapshot: the
frame in which the track had its best score, cropped to the object's box plus a margin, as a
JPEG of at most ``snapshot.max_bytes`` bytes. A track closed by a *restart* has none (its
frames died with the process).

* Topic ``snapshots_topic`` = ``{prefix}/{node}/snapshots/{camera}`` (QoS 1, not retained),
  through the same durable outbox as results and events, in its own seq series per camera
  (``snapshots_stream``): dedup key (node, camera, seq) on that topic, ``seq_reset`` on the
  first of a new series, like results (docs/outbox.md).
* The payload is JSON (like every message): the track id and label, the frame time ``ts`` and
  ``score`` of the best detection, its ``box`` and the ``crop`` region (both (x1, y1, x2, y2)
  in frame fractions), the JPEG's ``width`` and ``height`` in pixels and the bytes themselves,
  base64 (``jpeg``). ``decode_snapshot`` checks the JSON, the base64, the JPEG markers and the
  size cap; it does not decode pixels (a subscriber decides whether to).

``FRAME_KEY`` is not on the wire: the in-process key under which the streaming pipeline hands
a result's frame (a BGR ``numpy`` array) to the tracking sink of a camera that takes snapshots;
the sink removes it before anything serialises the result.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.contract import protocol

#: In-process only: the result dict's key for its frame (see the module docstring).
FRAME_KEY = "_frame"
#: Largest JPEG a snapshot may carry (bytes): base64 makes it 4/3 larger, and the message must
#: stay under ``protocol.MAX_PAYLOAD_BYTES`` with its other fields.
MAX_JPEG_BYTES = 180_000
#: Most zones a snapshot names: a camera has at most this many (``cameras[].zones``).
MAX_ZONES = 64
#: A JPEG starts with SOI and ends with EOI.
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


def snapshots_topic(prefix: str, node: str, camera: str) -> str:
    """Topic of one camera's track snapshots (QoS 1, not retained; through the outbox)."""
    return f"{prefix}/{node}/snapshots/{camera}"


def snapshots_filter(prefix: str, node: str = "+", camera: str = "+") -> str:
    """Subscription filter for snapshots (``+`` wildcards by default)."""
    return f"{prefix}/{node}/snapshots/{camera}"


def snapshots_stream(camera: str) -> str:
    """The outbox's seq series key of a camera's snapshots (no ``/`` in camera names: it never
    collides with the results' bare camera name or ``events/{camera}``)."""
    return f"snapshots/{camera}"


Box = tuple[float, float, float, float]


class SnapshotMessage(BaseModel):
    """One snapshot on ``snapshots_topic``. Dedup key: (node, camera, seq) on that topic."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = 1
    node: str
    camera: str
    seq: int = Field(ge=0)
    seq_reset: protocol.SeqReset | None = None
    #: The track (``contract.events.EventMessage.track``) and its label.
    track: int = Field(ge=0)
    label: str
    #: Capture time of the frame (the track's best detection), Unix seconds, and its score.
    ts: float
    score: float
    #: The object's box and the cropped region, (x1, y1, x2, y2) in frame fractions.
    box: Box
    crop: Box
    #: The JPEG's size in pixels (smaller than the region when it was scaled down to fit).
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    #: The JPEG, base64 (standard alphabet, padded).
    jpeg: str
    #: When it was taken: ``end`` (the best frame of the whole track, sent when it ended; what
    #: agents before this field sent) or ``new`` (the frame that confirmed the track, sent at
    #: once with its ``new`` event, for an alert's picture; ``cameras[].snapshot.at``).
    at: Literal["new", "end"] = "end"
    #: The zones the track had been in (after their dwell) when the snapshot was taken, in the
    #: order it first entered them: for ``end`` every zone of its visits, for ``new`` those it
    #: was in at confirmation. Lets a consumer filter snapshots by zone without having seen the
    #: track's events (absent from agents before this field: read as none).
    zones: list[str] = Field(default_factory=list, max_length=MAX_ZONES)

    def image_bytes(self) -> bytes:
        """The JPEG bytes (``decode_snapshot`` checked they decode)."""
        return base64.b64decode(self.jpeg)


def decode_snapshot(payload: bytes, *, max_jpeg_bytes: int = MAX_JPEG_BYTES) -> SnapshotMessage:
    """Parse a snapshot payload; raise ``protocol.ProtocolError`` when it breaks the contract
    (not JSON, wrong fields, ``jpeg`` not base64 or not a JPEG, or over ``max_jpeg_bytes``)."""
    msg = protocol.decode_model(payload, SnapshotMessage)
    try:
        jpeg = base64.b64decode(msg.jpeg, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise protocol.ProtocolError("SnapshotMessage: jpeg: not base64") from exc
    if len(jpeg) > max_jpeg_bytes:
        raise protocol.ProtocolError(
            f"SnapshotMessage: jpeg: {len(jpeg)} bytes exceeds {max_jpeg_bytes}")
    if not (jpeg.startswith(_SOI) and jpeg.endswith(_EOI)):
        raise protocol.ProtocolError("SnapshotMessage: jpeg: not a JPEG (no SOI/EOI markers)")
    return msg


def build_snapshot(*, node: str, camera: str, track: int, label: str, ts: float, score: float,
                   box: Box, crop: Box, width: int, height: int, jpeg: bytes,
                   at: str = "end", zones: Sequence[str] = ()) -> dict[str, Any]:
    """One snapshot payload (without ``seq``: the outbox adds it at commit)."""
    return {"v": protocol.PROTOCOL_VERSION, "node": node, "camera": camera, "track": track,
            "label": label, "ts": ts, "score": score, "box": list(box), "crop": list(crop),
            "width": width, "height": height, "jpeg": base64.b64encode(jpeg).decode("ascii"),
            "at": at, "zones": list(zones)}
