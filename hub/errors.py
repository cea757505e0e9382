"""The hub's exception hierarchy. API handlers map these to 4xx JSON errors with stable codes;
the CLI maps them to one line on stderr and a non-zero exit."""

from __future__ import annotations


class HubError(Exception):
    """Base of errors the hub raises on purpose. ``code`` is the stable API error code."""

    code = "hub_error"
    http_status = 400
    exit_code = 1


class InvalidRequest(HubError):
    code = "invalid_request"
    http_status = 400
    exit_code = 2


class NotFound(HubError):
    code = "not_found"
    http_status = 404


class Conflict(HubError):
    code = "conflict"
    http_status = 409


class Unauthorized(HubError):
    code = "unauthorized"
    http_status = 401


class TooLarge(HubError):
    code = "too_large"
    http_status = 413


class ArtifactRejected(HubError):
    """An uploaded model that fails validation (not ONNX, shape mismatch, bad signature).

    ``reason``: the contract's stable rejection reason when its shared checks refused the model
    (the same an agent gives at load), sent beside ``code`` in the JSON error; else None.
    """

    code = "artifact_rejected"
    http_status = 422

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
