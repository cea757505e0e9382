"""Per-camera sequence numbers that never go back: blocks reserved durably before use.

Part of the outbox (see ``edge_agent.outbox.facade``): ``publish`` hands out seqs from the camera's
current block without touching SQLite; the commit thread tops blocks up ahead of use, in the
same transaction as the results, sized to the rate; a camera that runs out reserves a bigger
block synchronously. A restart skips the unused rest of each block, so no seq is handed out
twice, not even one whose result was lost in the crash window. Runs under the outbox's locks
(``_db_lock`` before ``_lock``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent.outbox.db import error_kind

if TYPE_CHECKING:
    from edge_agent.outbox.facade import Outbox

#: Smallest and largest seq block reserved per camera at a time. Blocks adapt to the rate, so
#: a restart skips at most one block (a 30 fps camera skips a few hundred seqs).
SEQ_BLOCK_MIN = 256
SEQ_BLOCK_MAX = 65536


def seq_base_us() -> int:
    """The first seq of a camera new to the file: the wall clock in microseconds."""
    return time.time_ns() // 1000


@dataclass
class Cam:
    """One camera's seq state."""

    #: The next seq to hand out.
    next: int
    #: Seqs below this may be handed out without asking SQLite first.
    limit: int
    #: The next-free seq on disk. Normally ``durable >= limit``; only while the file cannot be
    #: written does ``limit`` run ahead (seqs then handed out unreserved, see docs/outbox.md).
    durable: int
    block: int = SEQ_BLOCK_MIN
    #: ``next`` at the previous commit round (the rate that sizes the next block).
    at_round: int = -1

    def __post_init__(self) -> None:
        if self.at_round < 0:
            self.at_round = self.next


class SeqBlocks:
    """Seq reservation for one ``Outbox``."""

    def __init__(self, ob: Outbox, log_error: Callable[..., None]) -> None:
        self.ob = ob
        self._log_error = log_error

    def reserve_known(self, cams: list[str]) -> None:
        """Reserve a block for each camera in memory and in ``cams`` (under ``_db_lock``)."""
        ob = self.ob
        want: dict[str, int] = {}
        with ob._lock:
            for cam in cams:
                if cam not in ob._cams:
                    b = seq_base_us()
                    ob._cams[cam] = Cam(next=b, limit=b, durable=b)
            for cam, st in ob._cams.items():
                if st.limit - st.next < st.block // 2 or st.durable < st.limit:
                    want[cam] = max(st.limit, st.next + st.block)
        if want and self.write(want):
            with ob._lock:
                for cam, w in want.items():
                    st = ob._cams[cam]
                    st.durable = max(st.durable, w)
                    st.limit = max(st.limit, w)

    def reserve(self, cam: str) -> None:
        """``publish`` ran out of reserved seqs for ``cam``: reserve a bigger block now."""
        ob = self.ob
        with ob._db_lock:
            with ob._lock:
                st = ob._cams.get(cam)
                if st is None:
                    b = seq_base_us()
                    st = ob._cams[cam] = Cam(next=b, limit=b, durable=b)
                elif st.next < st.limit:
                    return  # another caller reserved meanwhile
                else:
                    st.block = min(SEQ_BLOCK_MAX, st.block * 4)
                want = st.next + st.block
            ok = ob.stats.db_open and self.write({cam: want})
            with ob._lock:
                # When the file cannot be written, hand seqs out anyway (a result must get
                # one); the round that commits them makes the reservation durable.
                st.limit = max(st.limit, want)
                if ok:
                    st.durable = max(st.durable, want)

    def write(self, want: dict[str, int]) -> bool:
        db = self.ob._db
        if db.conn is None:
            return False
        try:
            db.begin()
            db.set_seqs(want)
            db.commit()
            return True
        except sqlite3.Error as exc:
            db.rollback()
            self._log_error("outbox_seq_reserve_failed", kind=error_kind(exc),
                            error=str(exc)[:200])
            return False

    def targets(self) -> dict[str, int]:
        """Under ``_lock``: the durable next-free seq each camera needs after this round."""
        want: dict[str, int] = {}
        for cam, st in self.ob._cams.items():
            per_round = st.next - st.at_round
            st.at_round = st.next
            if per_round > 0:
                size = SEQ_BLOCK_MIN
                while size < 4 * per_round and size < SEQ_BLOCK_MAX:
                    size *= 2
                st.block = max(size, st.block // 2, SEQ_BLOCK_MIN)
            target = st.limit
            if st.limit - st.next < max(st.block // 2, 2 * per_round):
                target = st.next + st.block
            target = max(target, st.next)
            if target > st.durable:
                want[cam] = target
        return want
