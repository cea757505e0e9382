"""The ONNX graph checks a model must pass against its manifest, for the hub and the agent alike.

The hub runs them when a model is pushed (``check_model``: a bare CPU session, optimisations
off) and the agent when it loads one (``check_signature`` on the session it will serve with), so
a model the hub accepts is one every agent loads, and both refuse with the same
``rejection.Rejection``: the same reason and the same message.

Checked, in order: onnxruntime loads the bytes; the graph has the manifest's input, and only
that one; it is ``tensor(float)`` with rank 4, 3 channels and the manifest's width, height and
batch where its layout puts them (symbolic dims match any size, but ``batch: dynamic`` needs a
symbolic batch axis); every manifest output exists with the same rank and equal fixed dims; and
the outputs suit the task (``tasks.check_outputs``). What the graph does with real inputs is
the agent's business (warm-up and model-sync validation, ``check_output_arrays``).

onnxruntime is imported only when a session is opened: importing the contract stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.contract import tasks
from edge_agent.contract.rejection import Reason, Rejection

if TYPE_CHECKING:
    import onnxruntime as ort

    from edge_agent.contract.manifest import ModelManifest

#: A dimension as onnxruntime reports it: a size, a symbolic name, or None (unnamed, any size).
Dim = int | str | None
#: Longest onnxruntime error text kept in a rejection message.
MAX_ERROR_CHARS = 300
#: The one input element type the engine feeds (float32).
INPUT_TYPE = "tensor(float)"


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: name, element type (``tensor(float)``...) and shape."""

    name: str
    type: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class Signature:
    """What the checks read from a graph: its inputs and outputs, in the graph's order."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


class _NodeArg(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


class Session(Protocol):
    """The part of ``onnxruntime.InferenceSession`` the checks read."""

    def get_inputs(self) -> Sequence[_NodeArg]: ...
    def get_outputs(self) -> Sequence[_NodeArg]: ...


def _dim(d: Any) -> Dim:
    return d if isinstance(d, (int, str)) and not isinstance(d, bool) else None


def signature(session: Session) -> Signature:
    """The inputs and outputs of a loaded session."""
    def one(arg: _NodeArg) -> Tensor:
        return Tensor(arg.name, arg.type, tuple(_dim(d) for d in arg.shape))
    return Signature(tuple(one(a) for a in session.get_inputs()),
                     tuple(one(a) for a in session.get_outputs()))


def one_line(exc: BaseException) -> str:
    """A foreign error's text on one line, at most ``MAX_ERROR_CHARS`` long."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def load_failure(exc: BaseException) -> Rejection:
    """The rejection for bytes onnxruntime cannot load, from the exception it raised."""
    return Rejection(Reason.NOT_ONNX, f"not a loadable ONNX model: {one_line(exc)}")


def open_session(data: bytes) -> ort.InferenceSession:
    """A bare CPU session on ``data`` for checking only; ``Rejection(NOT_ONNX)`` if it fails.

    Blocking (onnxruntime parses and builds the graph): call it in a thread. Optimisations and
    memory arenas are off, so the load is quick and leaves memory flat.
    """
    import onnxruntime as ort  # noqa: PLC0415 - heavy; loaded only when a graph is checked

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: the warnings are about graphs we do not own
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for bad bytes
        raise load_failure(exc) from exc


def check_model(data: bytes, manifest: ModelManifest) -> Signature:
    """Load ``data`` on the CPU and check its graph against ``manifest`` (blocking)."""
    session = open_session(data)
    try:
        sig = signature(session)
    finally:
        del session
    check_signature(sig, manifest)
    return sig


def dims_match(want: Sequence[Dim], got: Sequence[Dim]) -> bool:
    """Same rank, and every dimension fixed (an int) on both sides is equal."""
    if len(want) != len(got):
        return False
    return all(
        not (isinstance(w, int) and isinstance(g, int)) or w == g
        for w, g in zip(want, got, strict=True)
    )


def check_signature(sig: Signature, manifest: ModelManifest) -> None:
    """Raise ``Rejection`` when the graph's input or outputs disagree with ``manifest``."""
    _check_input(sig, manifest)
    outputs = {o.name: o for o in sig.outputs}
    shapes: list[tuple[str, Sequence[Dim]]] = []
    for o in manifest.outputs:
        if o.name not in outputs:
            raise Rejection(
                Reason.OUTPUT_MISSING,
                f"model has no output {o.name!r} (outputs: {sorted(outputs)})",
            )
        shape = outputs[o.name].shape
        if not dims_match(o.shape, shape):
            raise Rejection(
                Reason.OUTPUT_SHAPE,
                f"model output {o.name!r} has shape {list(shape)}, manifest says {o.shape}",
            )
        # a dimension the manifest leaves symbolic may be fixed in the graph
        shapes.append((o.name, [g if isinstance(g, int) else w for w, g in
                                zip(o.shape, shape, strict=True)]))
    tasks.check_outputs(tasks.get(manifest.task), shapes, manifest.labels)


def _check_input(sig: Signature, manifest: ModelManifest) -> None:
    spec = manifest.input
    inputs = {i.name: i for i in sig.inputs}
    if spec.name not in inputs:
        raise Rejection(
            Reason.INPUT_NAME, f"model has no input {spec.name!r} (inputs: {sorted(inputs)})")
    if len(inputs) != 1:
        raise Rejection(
            Reason.INPUT_COUNT, f"model has {len(inputs)} inputs, the engine feeds one")
    graph_in = inputs[spec.name]
    if graph_in.type != INPUT_TYPE:
        raise Rejection(
            Reason.INPUT_TYPE, f"model input type {graph_in.type} is not {INPUT_TYPE}")
    batch: int | str = spec.batch if isinstance(spec.batch, int) else "batch"
    want: list[Dim] = (
        [batch, 3, spec.height, spec.width] if spec.layout == "NCHW"
        else [batch, spec.height, spec.width, 3]
    )
    got = list(graph_in.shape)
    if not dims_match(want, got):
        raise Rejection(
            Reason.INPUT_SHAPE,
            f"model input {spec.name!r} has shape {got}, manifest says {spec.layout} "
            f"{spec.width}x{spec.height} (batch {spec.batch})",
        )
    if spec.batch == "dynamic" and isinstance(got[0], int):
        raise Rejection(
            Reason.INPUT_BATCH, f"model input batch is fixed at {got[0]}, manifest says dynamic")


def check_output_arrays(manifest: ModelManifest, shapes: Sequence[Sequence[int]]) -> None:
    """Raise ``Rejection`` when outputs a real run produced (their shapes, in the manifest's
    order) disagree with the manifest or the task: a graph need not declare every dimension.

    The agent runs this on its warm-up outputs; the hub never runs a model.
    """
    for want, got in zip(manifest.outputs, shapes, strict=True):
        if not dims_match(want.shape, list(got)):
            raise Rejection(
                Reason.OUTPUT_SHAPE,
                f"model output {want.name!r} has shape {list(got)}, manifest says {want.shape}",
            )
    tasks.check_outputs(
        tasks.get(manifest.task),
        [(o.name, list(s)) for o, s in zip(manifest.outputs, shapes, strict=True)],
        manifest.labels,
    )
