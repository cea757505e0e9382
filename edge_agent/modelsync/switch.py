"""Switching a version in: one assignment in its slot, a probation, and the way back.

A version that passed the shadow load and validation (``modelsync.check``) can still fail on
real frames. So the switch keeps the previous session loaded while the first inferences of the
new one are counted (``streaming.slots.Probation``): too many failures and the slot serves the
previous version again, as instantly as it switched. Only after the verdict is one of the two
handed back for release, once no frame uses it any more (``ModelSlot.retire``).

``modelsync.sync`` decides *what* to serve and records the outcome (status, persisted state,
counters); this module only performs the switch and delivers the verdict. Models travel in
one-element lists ("boxes") so no local variable here keeps a replaced session alive.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from edge_agent.config import ModelSyncSettings
from edge_agent.streaming.slots import ModelSlot, Probation, ServingModel


@dataclass(frozen=True)
class Verdict:
    """How the probation of a switched-in version ended."""

    passed: bool
    #: The last inference error when it failed; ``timeout`` when no verdict came in time
    #: (few frames flow, or newer work waits), ``first`` when nothing served before.
    detail: str = ""


class Switch:
    """A new version switched into its slot; the previous one stays loaded until the verdict.

    Constructing it performs the switch (the next lease gets the new version). Then await
    ``verdict``, and call ``keep`` or ``roll_back``: each returns the box to retire.
    """

    def __init__(
        self,
        slot: ModelSlot,
        box: list[ServingModel],
        settings: ModelSyncSettings,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._slot = slot
        self._timeout = settings.probation_timeout_s
        new = box.pop()
        outcome: asyncio.Future[Verdict] = loop.create_future()

        def settle(verdict: Verdict) -> None:  # on the loop (the slot's callbacks)
            if not outcome.done():
                outcome.set_result(verdict)

        self._outcome = outcome
        probation = Probation(new, settings.probation_frames, settings.probation_failures,
                              on_fail=lambda err: settle(Verdict(False, err)),
                              on_pass=lambda: settle(Verdict(True)))
        # nothing served before: nothing to switch back to, so no probation
        self._old = slot.swap(new, probation if slot.model is not None else None)
        del probation
        self._new: ServingModel | None = new
        #: The version switched in, its digest, and the version it replaced (None: none).
        self.version = str(new.version)
        self.sha256 = str(new.sha256)
        self.previous = None if self._old is None else str(self._old.version)

    async def verdict(self, interrupt: asyncio.Event) -> Verdict:
        """Wait for the probation's verdict; ``interrupt`` set (newer work) ends it as passed.

        Without a verdict within ``probation_timeout_s`` the new version stays (passed).
        """
        if self._old is None:
            return Verdict(True, "first")
        wake: asyncio.Future[Any] = asyncio.ensure_future(interrupt.wait())
        waiting: set[asyncio.Future[Any]] = {self._outcome, wake}
        try:
            await asyncio.wait(waiting, timeout=self._timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
        self._slot.end_probation()
        if self._outcome.done():
            return self._outcome.result()
        return Verdict(True, "timeout")

    def keep(self) -> list[ServingModel]:
        """The new version stays: return the box holding the previous one (maybe empty)."""
        box = [] if self._old is None else [self._old]
        self._old = self._new = None
        return box

    def roll_back(self) -> list[ServingModel]:
        """Serve the previous version again: return the box holding the failed one."""
        assert self._old is not None and self._new is not None
        self._slot.swap(self._old)
        box = [self._new]
        self._old = self._new = None
        return box
