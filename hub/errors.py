"""The hub's exception hierarchy. API handlers map these to 4xx JSON errors with stable codes;
the CLI maps them to one line on stderr and a non-zero exit."""

from __future__ import annotations

from typing import Any, ClassVar


class HubError(Exception):
    """Base of errors the hub raises on purpose.

    Each error class names, in its class line, what it is on the outside: ``code``, the stable
    API error code; ``http_status``, the status the API answers with; ``exit_code``, the CLI's
    exit status. What a class leaves out it inherits: ``class NotFound(HubError,
    code="not_found", http_status=404)`` exits 1 like every ``HubError``.
    """

    code: ClassVar[str] = "hub_error"
    http_status: ClassVar[int] = 400
    exit_code: ClassVar[int] = 1

    def __init_subclass__(cls, *, code: str | None = None, http_status: int | None = None,
                          exit_code: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status
        if exit_code is not None:
            cls.exit_code = exit_code


class InvalidRequest(HubError, code="invalid_request", http_status=400, exit_code=2):
    """A request the hub refuses as it stands (a bad name, field, selector or gate)."""


class NotFound(HubError, code="not_found", http_status=404):
    """A model version, rollout or node the hub does not know."""


class Conflict(HubError, code="conflict", http_status=409):
    """A request at odds with the hub's state: a version in use, an overlapping rollout."""


class Unauthorized(HubError, code="unauthorized", http_status=401):
    """A write without the right bearer token (or to a hub with none configured)."""


class Forbidden(HubError, code="forbidden", http_status=403):
    """The caller is known, but its token (or certificate) may not do this."""


class TooLarge(HubError, code="too_large", http_status=413):
    """An upload or request part over its configured limit."""


class ArtifactRejected(HubError, code="artifact_rejected", http_status=422):
    """An uploaded model that fails validation (not ONNX, shape mismatch, bad signature).

    ``reason``: the contract's stable rejection reason when its shared checks refused the model
    (the same an agent gives at load), sent beside ``code`` in the JSON error; else None.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
