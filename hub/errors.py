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
    """An uploaded model that fails validation (not ONNX, shape mismatch, bad signature)."""

    code = "artifact_rejected"
    http_status = 422
