"""The model manifest: the JSON file beside an ONNX file that says how to feed and read it.

A model artifact alone does not say which colour order, normalization, input size or output
layout it expects; getting any of them wrong gives plausible but wrong results rather than an
error. The manifest states them once, is checked against the ONNX graph when the model loads
(``engine.LoadedModel.load``), and travels with the artifact through the hub's registry.

Fields are documented in models/README.md. Unknown keys are rejected, so a typo in a
hand-written manifest is an error, not a silently ignored setting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.contract.protocol import SHA256_PATTERN, Name, Version
from edge_agent.errors import ModelError
from edge_agent.inference.postprocess import get_unit, tasks

#: Manifest format this code reads and writes.
MANIFEST_FORMAT: Literal[1] = 1

#: The file name ``models/build.py`` and ``models/generate.py`` give every manifest.
MANIFEST_NAME = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """The one image input: size, layout and the pixel transform.

    A pixel value ``p`` (0-255, in ``color`` order) becomes ``(p * scale - mean[c]) / std[c]``.
    """

    #: Name of the graph input.
    name: str
    width: int = Field(gt=0, le=8192)
    height: int = Field(gt=0, le=8192)
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
    #: Post-processing unit, by registered task name (``classification``, ``yolo``,
    #: ``centerface``; see ``edge_agent.inference.postprocess``).
    task: str
    #: ONNX file name, relative to the manifest's folder.
    file: str
    #: sha256 of the ONNX file, lowercase hex.
    sha256: str
    input: InputSpec
    labels: list[str] = Field(default_factory=list)
    outputs: list[OutputSpec]
    #: Task-specific parameters, validated by the task's post-processing unit.
    postprocess: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    #: Where the weights come from and their licence (informational).
    source: str = ""
    license: str = ""



    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not re.match(SHA256_PATTERN, v):
            raise ValueError("must be 64 lowercase hex digits")
        return v

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        # The file sits beside the manifest: no folders, no way out of the model's folder.
        if not v or "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError("must be a plain file name beside the manifest")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if v not in tasks():
            raise ValueError(f"unknown task {v!r}; known tasks: {', '.join(sorted(tasks()))}")
        return v

    @model_validator(mode="after")
    def _unit(self) -> ModelManifest:
        # the task's own unit checks its parameters and the outputs it needs
        get_unit(self.task).validate_params(self)
        return self

    def to_json(self) -> str:
        """The manifest as indented JSON text (what ``write_manifest`` stores)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def parse_manifest(data: Any, *, source: str = "manifest") -> ModelManifest:
    """Validate a decoded manifest object; raise ``ModelError`` naming the first bad field."""
    if not isinstance(data, dict):
        raise ModelError(f"{source}: manifest must be a JSON object")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        more = len(exc.errors()) - 1
        tail = f" (and {more} more)" if more else ""
        raise ModelError(f"{source}: invalid manifest: {where}: {msg}{tail}") from exc
    except ModelError as exc:
        raise ModelError(f"{source}: invalid manifest: {exc}") from exc


def load_manifest(path: str | Path) -> ModelManifest:
    """Read and validate a manifest file; raise ``ModelError`` with a one-line reason."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"{p}: manifest not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{p}: cannot read manifest: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{p}: manifest is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    return parse_manifest(data, source=str(p))


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
