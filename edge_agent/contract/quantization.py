"""The quantisation report: what an INT8 version cost in accuracy and gained in speed.

``edge-hub models quantize`` makes an INT8 version from an fp32 one on the operator's machine,
measures it against its parent on frames the calibration did not see, and pushes it with this
report; the hub stores the report beside the version (registry metadata, not the manifest, so
the manifest an agent verifies stays the plain one) and shows it with ``models show``. It lives
in the contract because both sides read it: the agent's engine code writes it, the hub checks
and serves it. Every field has a meaning a reader can check against the measurement that made
it; unknown keys are refused so a typo never passes as a figure.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Largest report the hub stores, bytes of JSON (a report is about 1 KiB).
MAX_REPORT_BYTES = 16 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class QuantSettings(_Strict):
    """How ONNX Runtime quantised the graph (``onnxruntime.quantization.quantize_static``)."""

    #: Always QDQ: QuantizeLinear/DequantizeLinear pairs around fp32 ops, which ORT fuses into
    #: integer kernels on CPU and which other providers (TensorRT) also read.
    format: Literal["QDQ"] = "QDQ"
    #: One scale per output channel of each weight (else one per tensor).
    per_channel: bool
    #: How activation ranges come from the calibration frames.
    calibration: Literal["minmax", "entropy", "percentile"]
    #: The percentile kept, for ``calibration == "percentile"``.
    percentile: float | None = Field(None, gt=0.0, le=100.0)
    activations: Literal["QUInt8", "QInt8"] = "QUInt8"
    weights: Literal["QInt8", "QUInt8"] = "QInt8"
    #: 7-bit weight ranges (ORT's ``reduce_range``, for CPUs without VNNI).
    reduce_range: bool = False
    #: Op types left in fp32 (e.g. the classifier head), empty when every op was quantised.
    fp32_op_types: list[str] = Field(default_factory=list, max_length=32)
    #: The first N compute nodes (Conv, ConvTranspose, Gemm, MatMul in graph order) left in
    #: fp32: errors made at full resolution reach every later layer (docs/registry.md).
    fp32_first_nodes: int = Field(0, ge=0)
    #: The names of the nodes left in fp32 (by op type or as a leading node; the quantiser
    #: lists at most 64).
    fp32_nodes: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=256)


class FrameSet(_Strict):
    """Frames used for one purpose: how many, and where they came from (paths as given)."""

    frames: int = Field(ge=0)
    source: str = Field(max_length=1024)


class Agreement(_Strict):
    """INT8's answers against fp32's on the held-out frames, the shadow gate's semantics
    (``edge_agent.streaming.shadow.agreement``): top-1 equal (classification), F1 of
    same-label boxes matched at IoU >= 0.5 (detection, faces); mean over frames, in [0, 1]."""

    metric: Literal["top1", "box_f1"]
    value: float = Field(ge=0.0, le=1.0)
    frames: int = Field(ge=0)
    #: Classification only: agreement over the frames where fp32's top-1 score is at least
    #: ``confident_min_score`` (frames the fp32 model itself is unsure of flip easily).
    confident_min_score: float | None = Field(None, ge=0.0, le=1.0)
    confident_value: float | None = Field(None, ge=0.0, le=1.0)
    confident_frames: int | None = Field(None, ge=0)


class Speed(_Strict):
    """fp32 and INT8 ``session.run`` frames per second on the machine that quantised,
    interleaved rounds (each round times both), batch 1, the agent's engine settings."""

    fp32_fps: float = Field(ge=0.0)
    int8_fps: float = Field(ge=0.0)
    #: Median over rounds of int8_fps / fp32_fps in the same round.
    speedup: float = Field(ge=0.0)
    rounds: int = Field(ge=1)
    intra_op_threads: int = Field(ge=1)
    cpu: str = Field("", max_length=256)
    cores: int = Field(ge=1)


class Candidate(_Strict):
    """One setting tried by the automatic choice, measured on the calibration frames."""

    fp32_first_nodes: int = Field(ge=0)
    #: Agreement with fp32 (the report's metric) over the calibration frames.
    agreement: float = Field(ge=0.0, le=1.0)
    #: Median INT8/fp32 ``session.run`` fps ratio over short interleaved rounds.
    speedup: float = Field(ge=0.0)


class Selection(_Strict):
    """How ``fp32_first_nodes`` was chosen: candidates from all-INT8 upwards, each measured
    against fp32 on the calibration frames (never the held-out ones, which only report); the
    first to reach ``target_agreement`` at a speed-up of at least ``min_speedup`` is kept, else
    the best agreement among those fast enough (``met`` false)."""

    target_agreement: float = Field(ge=0.0, le=1.0)
    min_speedup: float = Field(ge=0.0)
    frames: int = Field(ge=0)
    candidates: list[Candidate] = Field(max_length=16)
    met: bool


class QuantizationReport(_Strict):
    """The report stored with an INT8 version (the ``quantization`` field of a version)."""

    #: The fp32 version it was made from.
    parent_version: str = Field(max_length=64)
    parent_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    onnxruntime: str = Field(max_length=32)
    settings: QuantSettings
    calibration: FrameSet
    heldout: FrameSet
    agreement: Agreement
    speed: Speed
    #: Seconds the quantisation and the measurements took.
    elapsed_s: float = Field(ge=0.0)
    #: How the fp32 nodes were chosen, when they were chosen automatically (else null).
    selection: Selection | None = None
