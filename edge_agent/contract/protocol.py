"""The wire contract between agents, the hub and result subscribers.

Topic names, payload schemas, label keys and name patterns live here and nowhere else: the hub
imports this module and nothing else from the agent, and docs/protocol.md documents it. Changing
anything here changes what deployed nodes and subscribers see, so do it on purpose and bump
``PROTOCOL_VERSION`` for incompatible changes.

Payloads are JSON objects with ``"v": 1``. Receivers ignore unknown fields (so a newer sender can
add fields) but reject a payload whose known fields are missing or of the wrong type.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from edge_agent.contract import telemetry as _telemetry

# The telemetry payloads live in ``contract.telemetry``; the contract's users import them here.
CameraTelemetry = _telemetry.CameraTelemetry
LatencySummary = _telemetry.LatencySummary
ModelTelemetry = _telemetry.ModelTelemetry
OutboxTelemetry = _telemetry.OutboxTelemetry
OutputStats = _telemetry.OutputStats
ShadowTelemetry = _telemetry.ShadowTelemetry
TelemetryMessage = _telemetry.TelemetryMessage
MAX_CLASSES = _telemetry.MAX_CLASSES
OTHER_CLASS = _telemetry.OTHER_CLASS

PROTOCOL_VERSION = 1
DEFAULT_TOPIC_PREFIX = "edge"
DEFAULT_LABEL_PREFIX = "edge.ai"
#: The hub's HTTP path where an agent pod trades its projected ServiceAccount token and a CSR
#: for its node's certificate (``hub/api/pki.py`` serves it, ``edge_agent/identity`` asks).
BOOTSTRAP_PATH = "/v1/pki/bootstrap"

#: Largest payload a receiver parses; anything bigger is rejected before decoding.
MAX_PAYLOAD_BYTES = 256 * 1024

#: Node, camera and model names: DNS-label-like, so they are safe in topics, label keys and paths.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
#: Model versions: safe as a Kubernetes label value and a path segment (no ``/``, no ``..``).
VERSION_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(VERSION_PATTERN)
_SHA256_RE = re.compile(SHA256_PATTERN)
#: Node names in Kubernetes may contain dots (FQDNs); topics use them as they are.
NODE_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"
_NODE_RE = re.compile(NODE_PATTERN)
#: Desired generations are integers in [0, 2^53): exact in every JSON implementation (a
#: JavaScript dashboard, a double-based parser) and far inside SQLite's 64-bit integers.
MAX_GENERATION = 2**53


class ProtocolError(ValueError):
    """A payload or topic that does not follow the wire contract."""


def is_valid_name(name: str) -> bool:
    """True when ``name`` is a valid camera or model name."""
    return bool(_NAME_RE.match(name))


def is_valid_version(version: str) -> bool:
    """True when ``version`` is a valid model version string (``..`` is refused)."""
    return bool(_VERSION_RE.match(version)) and ".." not in version


def is_valid_node(node: str) -> bool:
    """True when ``node`` is a valid node name (a Kubernetes node name)."""
    return bool(_NODE_RE.match(node)) and ".." not in node


def is_valid_sha256(digest: str) -> bool:
    """True when ``digest`` is a sha256 as the contract writes it (64 lowercase hex digits)."""
    return bool(_SHA256_RE.match(digest))


def _rule(valid: Callable[[str], bool], message: str) -> AfterValidator:
    """A pydantic validator that refuses a string ``valid`` rejects, saying ``message``."""

    def check(v: str) -> str:
        if not valid(v):
            raise ValueError(message)
        return v

    return AfterValidator(check)


#: A camera or model name field for pydantic models (validated by NAME_PATTERN).
Name = Annotated[str, _rule(is_valid_name, "must be lowercase letters, digits and '-' (max 63)")]
#: A model version field for pydantic models (validated by VERSION_PATTERN, no ``..``).
Version = Annotated[
    str, _rule(is_valid_version, "must be letters, digits, '.', '_' or '-' (max 63, no '..')")
]
#: A node name field for pydantic models (validated by NODE_PATTERN, no ``..``).
Node = Annotated[
    str, _rule(is_valid_node, "must be a lowercase DNS name (letters, digits, '-', '.')")
]
#: A sha256 field for pydantic models (validated by SHA256_PATTERN).
Sha256 = Annotated[str, _rule(is_valid_sha256, "must be 64 lowercase hex digits")]


def _generation(v: object) -> int:
    # strict: a JSON string ("1000000"), a float or a bool is refused, not coerced
    if type(v) is not int or not 0 <= v < MAX_GENERATION:
        raise ValueError(f"must be an integer in [0, 2^53), got {str(v)[:40]!r}")
    return v


#: A desired-state generation (``DesiredMessage`` and ``StateMessage``): an integer in
#: [0, 2^53), never a string, a float or a negative number.
Generation = Annotated[int, BeforeValidator(_generation)]


# --------------------------------------------------------------------------------------- topics


def results_topic(prefix: str, node: str, camera: str) -> str:
    """Topic of one camera's results (QoS 1, not retained)."""
    return f"{prefix}/{node}/results/{camera}"


def telemetry_topic(prefix: str, node: str) -> str:
    """Topic of a node's periodic telemetry (not retained)."""
    return f"{prefix}/{node}/telemetry"


def state_topic(prefix: str, node: str) -> str:
    """Topic of a node's retained state; its last will says offline."""
    return f"{prefix}/{node}/state"


def desired_topic(prefix: str, node: str) -> str:
    """Topic of the hub's retained desired state for a node."""
    return f"{prefix}/{node}/desired"


def results_filter(prefix: str, node: str = "+", camera: str = "+") -> str:
    """Subscription filter for results (``+`` wildcards by default)."""
    return f"{prefix}/{node}/results/{camera}"


def telemetry_filter(prefix: str) -> str:
    """Subscription filter for every node's telemetry."""
    return f"{prefix}/+/telemetry"


def state_filter(prefix: str) -> str:
    """Subscription filter for every node's state."""
    return f"{prefix}/+/state"


TopicKind = Literal["results", "telemetry", "state", "desired"]


def parse_topic(prefix: str, topic: str) -> tuple[str, TopicKind, str | None]:
    """Split a topic into (node, kind, camera); raise ProtocolError if it is not ours."""
    if not topic.startswith(prefix + "/"):
        raise ProtocolError(f"topic {topic!r} is outside prefix {prefix!r}")
    parts = topic[len(prefix) + 1 :].split("/")
    if not is_valid_node(parts[0]):
        # a hub or consumer identity may write under its own name (the broker's pattern rights
        # apply to everyone): such names are never node names (docs/security.md)
        raise ProtocolError(f"topic {topic!r}: {parts[0][:80]!r} is not a node name")
    if len(parts) == 3 and parts[1] == "results":
        return parts[0], "results", parts[2]
    if len(parts) == 2 and parts[1] in ("telemetry", "state", "desired"):
        kind: TopicKind = parts[1]  # type: ignore[assignment]
        return parts[0], kind, None
    raise ProtocolError(f"topic {topic!r} is not a known topic")


# ---------------------------------------------------------------------------------- node labels


def camera_node_label(label_prefix: str = DEFAULT_LABEL_PREFIX) -> str:
    """The label the agent DaemonSet selects on (value ``"true"``)."""
    return f"{label_prefix}/camera-node"


def model_label(model: str, label_prefix: str = DEFAULT_LABEL_PREFIX) -> str:
    """The label whose value is the version of ``model`` assigned to a node."""
    return f"{label_prefix}/model.{model}"


def model_from_label(key: str, label_prefix: str = DEFAULT_LABEL_PREFIX) -> str | None:
    """The model name of a model label key, or None when ``key`` is not one."""
    head = f"{label_prefix}/model."
    return key[len(head) :] if key.startswith(head) else None


def shadow_label(model: str, label_prefix: str = DEFAULT_LABEL_PREFIX) -> str:
    """The label whose value is a candidate version of ``model`` to run in shadow on a node:
    loaded beside the active version, fed a sample of the same frames, compared, never
    published (a rollout's shadow phase sets and removes it)."""
    return f"{label_prefix}/shadow.{model}"


def shadow_from_label(key: str, label_prefix: str = DEFAULT_LABEL_PREFIX) -> str | None:
    """The model name of a shadow label key, or None when ``key`` is not one."""
    head = f"{label_prefix}/shadow."
    return key[len(head) :] if key.startswith(head) else None


# ------------------------------------------------------------------------------------- payloads


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class ModelRef(_Msg):
    """The model version that produced a result."""

    name: str
    version: str


class Latencies(_Msg):
    """Per-stage latencies of one frame, in milliseconds."""

    capture_to_start: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    end_to_end: float = 0.0


class Detection(_Msg):
    """One detected object. ``box`` is normalized xyxy in [0, 1] of the original frame."""

    cls: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    #: Optional keypoints (e.g. CenterFace's five face landmarks), normalized (x, y).
    landmarks: list[tuple[float, float]] | None = None


class ClassScore(_Msg):
    """One class of a classification result, best first in ``classes``."""

    id: int
    label: str
    score: float


class FrameSize(_Msg):
    """The original frame's size in pixels (boxes are normalized to it)."""

    width: int
    height: int


#: Why a camera's seq series started over (``SeqReset.reason``): the outbox file was created
#: (first start, or the previous file was deleted or lost), the previous file was corrupt and
#: moved aside, the file had no series for this camera, or the file came from an agent version
#: that reserved seqs in blocks (the rest of the last block is skipped once).
SEQ_RESET_REASONS = ("new_outbox", "corrupt_outbox", "new_camera", "upgrade")


class SeqReset(_Msg):
    """On the first result of a new seq series: seqs below ``first`` are another series.

    A subscriber that has seen the camera's previous series restarts its bookkeeping here
    instead of reporting the jump as missing results; seqs ``first`` .. ``seq - 1`` of the new
    series are missing (the outbox dropped them, counted) when the marked result is not the
    first one.
    """

    first: int = Field(ge=0)
    #: One of ``SEQ_RESET_REASONS``; a receiver accepts other words (a newer sender's).
    reason: str


class ResultMessage(_Msg):
    """One result per processed frame, on ``results_topic``. Dedup key: (node, camera, seq).

    ``seq`` counts a camera's committed results without holes (a hole is a lost result);
    ``seq_reset`` is set only on the first result of a new series.
    """

    v: Literal[1] = 1
    node: str
    camera: str
    seq: int = Field(ge=0)
    seq_reset: SeqReset | None = None
    #: Capture time of the frame, Unix seconds.
    ts: float
    model: ModelRef
    task: str
    frame: FrameSize
    latency_ms: Latencies
    detections: list[Detection] | None = None
    classes: list[ClassScore] | None = None


ModelStatus = Literal["loading", "active", "failed"]


class ModelState(_Msg):
    """One model on a node: what serves, and what is loading or failed."""

    name: str
    #: The version now serving frames (None before any version was ever active).
    version: str | None = None
    status: ModelStatus
    #: The version being loaded or that failed, when it differs from ``version``.
    target_version: str | None = None
    error: str | None = None
    #: The candidate running in shadow (``DesiredModel.shadow``), its load status and error.
    shadow_version: str | None = None
    shadow_status: ModelStatus | None = None
    shadow_error: str | None = None


class StateMessage(_Msg):
    """A node's retained state, on ``state_topic``. The last will is ``online: false``."""

    v: Literal[1] = 1
    node: str
    online: bool
    ts: float = 0.0
    #: The desired generation the node applied last (0 before any).
    generation: Generation = 0
    agent_version: str = ""
    providers: list[str] = Field(default_factory=list)
    models: list[ModelState] = Field(default_factory=list)


class ModelArtifact(_Msg):
    """One version of a model and where to fetch it."""

    version: Version
    sha256: Sha256
    #: Artifact URL (the hub's download endpoint). The manifest is at ``manifest_url``.
    url: str
    manifest_url: str
    #: Optional base64 ed25519 signature over ``signing_payload(manifest_sha256, sha256)``.
    signature: str | None = None


class DesiredModel(ModelArtifact):
    """The version of one model the hub wants a node to serve, and where to fetch it."""

    #: A candidate to load beside it and run in shadow (never serving a result).
    shadow: ModelArtifact | None = None


class DesiredMessage(_Msg):
    """The hub's desired state for one node, retained on ``desired_topic``.

    ``generation`` only grows; an agent ignores a message whose generation is not newer than
    the one it applied.
    """

    v: Literal[1] = 1
    node: str
    generation: Generation
    models: dict[str, DesiredModel]

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, DesiredModel]) -> dict[str, DesiredModel]:
        for name in v:
            if not is_valid_name(name):
                raise ValueError(f"invalid model name {name!r}")
        return v


def encode(msg: BaseModel) -> bytes:
    """Serialize a message to compact JSON bytes (None fields omitted)."""
    return orjson.dumps(msg.model_dump(mode="json", exclude_none=True))


def encode_dict(obj: dict[str, Any]) -> bytes:
    """Serialize an already-built payload dict (the per-frame fast path)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


_M = TypeVar("_M", bound=BaseModel)


def decode_model(payload: bytes, model: type[_M]) -> _M:
    """Parse one payload of the contract into ``model``: bounded size, a JSON object of this
    protocol version, the model's fields; ``ProtocolError`` naming the first bad field."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("payload is not a JSON object")
    if data.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {data.get('v')!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"{model.__name__}: {where}: {first['msg']}") from exc


def decode_result(payload: bytes) -> ResultMessage:
    """Parse a results payload; raise ProtocolError when it breaks the contract."""
    return decode_model(payload, ResultMessage)


def decode_telemetry(payload: bytes) -> TelemetryMessage:
    """Parse a telemetry payload; raise ProtocolError when it breaks the contract."""
    return decode_model(payload, TelemetryMessage)


def decode_state(payload: bytes) -> StateMessage:
    """Parse a state payload; raise ProtocolError when it breaks the contract."""
    return decode_model(payload, StateMessage)


def decode_desired(payload: bytes) -> DesiredMessage:
    """Parse a desired-state payload; raise ProtocolError when it breaks the contract."""
    return decode_model(payload, DesiredMessage)


def signing_payload(manifest_sha256: str, artifact_sha256: str) -> bytes:
    """The bytes an artifact signature covers: the manifest's and the model file's digests."""
    return f"edge-model-v1\n{manifest_sha256}\n{artifact_sha256}\n".encode()
