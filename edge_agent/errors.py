"""The agent's exception hierarchy, one branch per boundary.

Retry decisions branch on the type (``TemporaryError`` vs the rest), never on message text.
The CLI turns any ``AgentError`` into one line on stderr and a non-zero exit, no traceback.
"""

from __future__ import annotations

from edge_agent.contract import rejection as contract


class AgentError(Exception):
    """Base of every error the agent raises on purpose. ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class TemporaryError(AgentError):
    """Worth retrying (network down, broker unavailable, hub busy)."""


class InputError(AgentError):
    """A bad input file or request: missing, unreadable, not an image or video."""


class ModelError(AgentError):
    """A model artifact or manifest that cannot be served.

    ``rejection`` is the contract's verdict (stable ``reason`` code and message, the same the
    hub gives at push) when one of the shared checks refused the model, else None.
    """

    def __init__(self, message: str, *, rejection: contract.Rejection | None = None) -> None:
        super().__init__(message)
        self.rejection = rejection

    @classmethod
    def rejected(cls, rejection: contract.Rejection) -> ModelError:
        """The error for a manifest the contract refused (its text names the manifest's path)."""
        return cls(str(rejection), rejection=rejection)

    @property
    def reason(self) -> str | None:
        """The contract's stable reason code, or None when no shared check refused the model."""
        return self.rejection.reason.value if self.rejection is not None else None


class ModelRejectedError(ModelError):
    """A model refused before it served: digest mismatch, bad shape, validation failed."""

    def __init__(
        self,
        message: str,
        digest: str | None = None,
        *,
        rejection: contract.Rejection | None = None,
    ) -> None:
        self.digest = digest
        super().__init__(
            message if digest is None else f"{message} (sha256 {digest[:12]})",
            rejection=rejection,
        )


class OutboxFullError(AgentError):
    """The outbox refused a result under the ``reject-new`` policy (counted)."""
