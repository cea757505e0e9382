"""Waiting on a condition with a deadline: how tests wait, instead of sleeping for a guess.

``wait_until`` polls from a plain thread, ``until`` from a coroutine (its condition may itself
be a coroutine function). Both fail with ``AssertionError`` naming what they waited for, so a
timeout reads as the test's own failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition",
               poll: float = 0.01) -> None:
    """Poll ``cond`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                what: str = "condition", poll: float = 0.01) -> None:
    """Poll ``cond`` (sync or async) from the event loop; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)
