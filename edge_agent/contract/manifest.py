"""The model manifest: the JSON file beside an ONNX file that says how to feed and read it.

A model artifact alone does not say which colour order, normalization, input size or output
layout it expects; getting any of them wrong gives plausible but wrong results rather than an
error. The manifest states them once, travels with the artifact through the hub's registry, and
is checked against the ONNX graph (``graph``) by the hub at push and by the agent at load.

This module is the one schema both read: the hub calls ``parse_json`` on pushed bytes, the agent
``load_manifest`` on a file. Both raise ``rejection.Rejection`` with the same reason and message.
Fields are documented in models/README.md. Unknown keys are rejected, so a typo in a
hand-written manifest is an error, not a silently ignored setting; NaN and infinity are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edge_agent.contract import tasks
from edge_agent.contract.protocol import Name, Sha256, Version
from edge_agent.contract.rejection import Reason, Rejection

#: Manifest format this code reads and writes.
MANIFEST_FORMAT: Literal[1] = 1

#: The file name ``models/build.py`` and ``models/generate.py`` give every manifest.
MANIFEST_NAME = "manifest.json"
#: The agent's model cache keeps its bookkeeping for a version in this file beside the manifest.
CACHE_ENTRY_NAME = "entry.json"
#: Names the model file may not take: the agent keeps these files beside it.
RESERVED_FILE_NAMES = frozenset({MANIFEST_NAME, CACHE_ENTRY_NAME})
#: Largest input width or height, pixels. A frame is letterboxed to this size in memory for every
#: inference; 8192² x 3 float32 is 800 MB already.
MAX_SIDE = 8192
#: Longest model file name (a file system's limit for one path component).
MAX_FILE_NAME = 255


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputSpec(_Strict):
    """The one image input: size, layout and the pixel transform.

    A pixel value ``p`` (0-255, in ``color`` order) becomes ``(p * scale - mean[c]) / std[c]``.
    """

    #: Name of the graph input.
    name: str
    width: int = Field(gt=0, le=MAX_SIDE)
    height: int = Field(gt=0, le=MAX_SIDE)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    #: Keep the aspect ratio and pad (YOLO style), or stretch to width x height.
    letterbox: bool = True
    #: Pixel value of the letterbox padding (0-255, before normalization).
    pad_value: int = Field(114, ge=0, le=255)
    #: ``"dynamic"`` when the graph's batch axis is symbolic, else the fixed batch size.
    batch: Literal["dynamic"] | int = "dynamic"

    @field_validator("std")
    @classmethod
    def _std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s == 0 for s in v):
            raise ValueError("std must not contain 0")
        return v

    @field_validator("batch")
    @classmethod
    def _batch(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 1:
            raise ValueError("batch must be 'dynamic' or a positive integer")
        return v


class OutputSpec(_Strict):
    """One graph output. A string dimension is symbolic (any size), an integer must match."""

    name: str
    shape: list[int | str]


class ModelManifest(_Strict):
    """Everything the engine needs to serve one model version."""

    format: Literal[1] = MANIFEST_FORMAT
    name: Name
    version: Version
    #: Post-processing task, by name (``classification``, ``yolo``, ``centerface``; see
    #: ``tasks``).
    task: str
    #: ONNX file name, relative to the manifest's folder.
    file: str
    #: sha256 of the ONNX file, lowercase hex.
    sha256: Sha256
    input: InputSpec
    labels: list[str] = Field(default_factory=list)
    outputs: list[OutputSpec]
    #: Task-specific parameters, validated by the task's schema (``tasks``).
    postprocess: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    #: Where the weights come from and their licence (informational).
    source: str = ""
    license: str = ""

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        # The file sits beside the manifest: no folders, no way out of the model's folder, no
        # name a file system or the agent's own files would trip over.
        if (not v or "/" in v or "\\" in v or v in (".", "..") or not v.isprintable()
                or len(v) > MAX_FILE_NAME or v in RESERVED_FILE_NAMES):
            raise ValueError("must be a plain file name beside the manifest")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        try:
            tasks.get(v)
        except Rejection as exc:
            raise _custom(exc) from None
        return v

    @model_validator(mode="after")
    def _fits_task(self) -> ModelManifest:
        # the task's schema checks its parameters and the outputs it reads
        task = tasks.get(self.task)
        try:
            tasks.check_params(task, self.postprocess)
            tasks.check_outputs(task, [(o.name, o.shape) for o in self.outputs], self.labels)
        except Rejection as exc:
            raise _custom(exc) from None
        return self

    def to_json(self) -> str:
        """The manifest as indented JSON text (what ``write_manifest`` stores)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _custom(exc: Rejection) -> PydanticCustomError:
    """A pydantic error carrying the rejection's reason as its type (read by ``_rejection``)."""
    return PydanticCustomError(exc.reason.value, "{detail}", {"detail": exc.message})


#: Error types with a reason of their own (pydantic's, and ours from ``_custom``); every other
#: type is INVALID_FIELD.
_REASONS = {
    "missing": Reason.MISSING_FIELD,
    "extra_forbidden": Reason.UNKNOWN_KEY,
    **{r.value: r for r in (Reason.UNKNOWN_TASK, Reason.POSTPROCESS_PARAMS, Reason.TASK_OUTPUTS)},
}


def _rejection(exc: ValidationError) -> Rejection:
    """The first error of a failed validation as a rejection naming the field."""
    errors = exc.errors()
    first = errors[0]
    kind = first["type"]
    reason = _REASONS.get(kind, Reason.INVALID_FIELD)
    where = ".".join(str(p) for p in first["loc"])
    msg = "unknown key" if kind == "extra_forbidden" else first["msg"]
    more = len(errors) - 1
    tail = f" (and {more} more)" if more else ""
    return Rejection(reason, f"invalid manifest: {where + ': ' if where else ''}{msg}{tail}")


def parse_manifest(data: Any) -> ModelManifest:
    """Validate a decoded manifest object; raise ``Rejection`` naming the first bad field."""
    if not isinstance(data, dict):
        raise Rejection(Reason.MANIFEST_NOT_OBJECT, "manifest must be a JSON object")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        raise _rejection(exc) from exc


def parse_json(raw: bytes | str) -> ModelManifest:
    """Decode and validate manifest JSON (what the hub receives); raise ``Rejection``."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Rejection(
            Reason.MANIFEST_NOT_JSON,
            f"manifest is not valid JSON: {exc.msg} at line {exc.lineno}",
        ) from exc
    except UnicodeDecodeError as exc:
        raise Rejection(Reason.MANIFEST_NOT_JSON, "manifest is not UTF-8 text") from exc
    return parse_manifest(data)


def load_manifest(path: str | Path) -> ModelManifest:
    """Read and validate a manifest file; raise ``Rejection`` with the path as its source."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise Rejection(Reason.MANIFEST_UNREADABLE, "manifest not found", source=str(p)) from exc
    except OSError as exc:
        raise Rejection(
            Reason.MANIFEST_UNREADABLE, f"cannot read manifest: {exc.strerror}", source=str(p)
        ) from exc
    try:
        return parse_json(raw)
    except Rejection as exc:
        raise Rejection(exc.reason, exc.message, source=str(p)) from exc


def model_path(manifest_path: str | Path, manifest: ModelManifest) -> Path:
    """The ONNX file a manifest names (beside the manifest)."""
    return Path(manifest_path).parent / manifest.file


def write_manifest(path: str | Path, manifest: ModelManifest) -> Path:
    """Write ``manifest`` as JSON to ``path`` atomically (temp file + rename); return the path."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(p)
    return p
