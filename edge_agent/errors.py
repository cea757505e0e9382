"""The agent's exception hierarchy, one branch per boundary.

Retry decisions branch on the type (``TemporaryError`` vs the rest), never on message text.
The CLI turns any ``AgentError`` into one line on stderr and a non-zero exit, no traceback.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose. ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class TemporaryError(AgentError):
    """Worth retrying (network down, broker unavailable, hub busy)."""


class InputError(AgentError):
    """A bad input file or request: missing, unreadable, not an image or video."""


class ModelError(AgentError):
    """A model artifact or manifest that cannot be served."""


class ModelRejectedError(ModelError):
    """A model refused before it served: digest mismatch, bad shape, validation failed."""

    def __init__(self, reason: str, digest: str | None = None) -> None:
        self.reason = reason
        self.digest = digest
        super().__init__(reason if digest is None else f"{reason} (sha256 {digest[:12]})")


class OutboxFullError(AgentError):
    """The outbox refused a result under the ``reject-new`` policy (counted)."""
