"""Why a model version is refused: one exception and one vocabulary of reasons for both sides.

The agent refuses a model at load and the hub refuses it at push with the same checks
(``manifest`` and ``graph``), so they must also *say* the same thing: a stable, machine-readable
``reason`` that scripts and tests may branch on, and a one-line ``message`` for people. The agent
wraps a ``Rejection`` in its ``ModelError``/``ModelRejectedError``; the hub puts ``reason`` and
``message`` into its JSON error. Neither side rewords them.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Stable codes for a refused model. New checks add codes; existing ones never change."""

    # --- the manifest alone
    #: The manifest file is missing or unreadable (agent side; the hub receives bytes).
    MANIFEST_UNREADABLE = "manifest_unreadable"
    #: Not JSON text (or not UTF-8).
    MANIFEST_NOT_JSON = "manifest_not_json"
    #: JSON, but not an object.
    MANIFEST_NOT_OBJECT = "manifest_not_object"
    #: A required field is absent.
    MISSING_FIELD = "missing_field"
    #: A key the schema does not know (often a typo).
    UNKNOWN_KEY = "unknown_key"
    #: A field of the wrong type or out of range (including NaN and infinity).
    INVALID_FIELD = "invalid_field"
    #: ``task`` names no known post-processing task.
    UNKNOWN_TASK = "unknown_task"
    #: The ``postprocess`` section does not suit the task's parameter schema.
    POSTPROCESS_PARAMS = "postprocess_params"
    #: The outputs (count, rank, class count vs labels) do not suit the task.
    TASK_OUTPUTS = "task_outputs"
    # --- the ONNX graph against its manifest
    #: onnxruntime cannot load the bytes at all (truncated, not ONNX, unsupported op).
    NOT_ONNX = "not_onnx"
    #: The graph has not exactly one input.
    INPUT_COUNT = "input_count"
    #: The graph has no input of the manifest's ``input.name``.
    INPUT_NAME = "input_name"
    #: The input's element type is not ``tensor(float)``.
    INPUT_TYPE = "input_type"
    #: Rank, channels, width or height of the input differ from the manifest.
    INPUT_SHAPE = "input_shape"
    #: The manifest says ``batch: dynamic`` but the graph's batch axis is fixed.
    INPUT_BATCH = "input_batch"
    #: A manifest output the graph does not have.
    OUTPUT_MISSING = "output_missing"
    #: An output's rank or a fixed dimension differs from the manifest.
    OUTPUT_SHAPE = "output_shape"

    def __str__(self) -> str:
        return self.value



class Rejection(ValueError):
    """A model version that must not serve: ``reason`` (stable code) and ``message`` (one line).

    ``message`` never names a local path, so the agent and the hub give the same text for the
    same bytes. ``source`` (a manifest's path, on the agent) only prefixes ``str()``.
    """

    def __init__(self, reason: Reason, message: str, *, source: str | None = None) -> None:
        super().__init__(message if source is None else f"{source}: {message}")
        self.reason = reason
        self.message = message
        self.source = source

    def __repr__(self) -> str:
        return f"Rejection({self.reason.value!r}, {self.message!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # keep every field when the exception crosses a process boundary (pickle)
        return (_rebuild, (self.reason, self.message, self.source))


def _rebuild(reason: Reason, message: str, source: str | None) -> Rejection:
    return Rejection(reason, message, source=source)
