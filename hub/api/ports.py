"""What the REST API asks of the rest of the hub, as interfaces the server implements.

The API sits below the server in the layers (``hub/server`` composes it), so it never imports
the control plane: it names here the questions and commands it needs, and the composition root
(``hub/server/app.py``) hands in the object that answers them. Answers are plain JSON-ready
values; how a node or a rollout is put together from the cluster, the fleet and the desired
state is the server's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from hub.cluster.selectors import Selector
from hub.rollouts.model import RolloutSpec


class FleetControl(Protocol):
    """The rollout side as the fleet API (``hub/api/fleet.py``) sees it."""

    def nodes(self, selector: Selector) -> list[dict[str, Any]]:
        """Every camera node matching ``selector``: labels, assignments, health."""
        ...

    def node(self, name: str) -> dict[str, Any] | None:
        """One camera node, or None when the hub does not see it."""
        ...

    def versions(self, nodes: Iterable[str]) -> list[dict[str, Any]]:
        """Per model version over ``nodes``: node count and figures merged over them."""
        ...

    async def rollouts(self, limit: int) -> list[dict[str, Any]]:
        """Summaries of the latest rollouts, newest first."""
        ...

    async def rollout(self, rid: int, *, events: bool = False) -> dict[str, Any]:
        """A rollout with each node's live view (and its event log); NotFound when unknown."""
        ...

    async def plan_rollout(self, spec: RolloutSpec) -> dict[str, Any]:
        """The waves ``spec`` would run, changing nothing."""
        ...

    async def start_rollout(self, spec: RolloutSpec, *, actor: str) -> dict[str, Any]:
        """Start a rollout; its view as ``rollout`` gives it."""
        ...

    async def command(self, rid: int, verb: str, *, actor: str) -> dict[str, Any]:
        """Apply an operator command (``hub.rollouts.controller.VERBS``); the rollout after."""
        ...
