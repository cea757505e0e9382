"""Per-camera sequence numbers that never go back: blocks reserved durably before use.

Part of the outbox (see ``edge_agent.outbox.facade``): ``publish`` hands out seqs from the
camera's current block without touching SQLite; the commit thread tops blocks up ahead of use,
in the same transaction as the results, sized to the rate; a camera that runs out reserves a
bigger block synchronously. A restart skips the unused rest of each block, so no seq is handed
out twice, not even one whose result was lost in the crash window. The cameras' seq state
(``state.Cam``) lives in the shared state, since ``publish`` reads and advances it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable

from edge_agent.outbox.db import OutboxDB, error_kind
from edge_agent.outbox.state import Cam, Shared

#: Smallest and largest seq block reserved per camera at a time. Blocks adapt to the rate, so
#: a restart skips at most one block (a 30 fps camera skips a few hundred seqs).
SEQ_BLOCK_MIN = 256
SEQ_BLOCK_MAX = 65536


def seq_base_us() -> int:
    """The first seq of a camera new to the file: the wall clock in microseconds."""
    return time.time_ns() // 1000


def new_cam(base: int) -> Cam:
    """Seq state for a camera whose next free seq is ``base`` (nothing reserved beyond it)."""
    return Cam(next=base, limit=base, durable=base, block=SEQ_BLOCK_MIN, at_round=base)


class SeqBlocks:
    """Seq reservation for one outbox, on its shared state and SQLite file."""

    def __init__(self, state: Shared, db: OutboxDB, log_error: Callable[..., None]) -> None:
        self.state = state
        self.db = db
        self._log_error = log_error

    def adopt(self, on_disk: dict[str, int]) -> None:
        """Under ``lock``: take over the next-free seqs an opened file holds."""
        cams = self.state.cams
        for cam, nxt in on_disk.items():
            st = cams.get(cam)
            if st is None:
                cams[cam] = new_cam(nxt)
            else:
                st.next = max(st.next, nxt)
                st.durable = nxt
                st.limit = st.next  # reserve again before handing more out

    def reserve_known(self, cams: Iterable[str]) -> None:
        """Reserve a block for each camera in memory and in ``cams`` (takes ``db_lock``)."""
        state = self.state
        with state.db_lock:
            want: dict[str, int] = {}
            with state.lock:
                for cam in cams:
                    if cam not in state.cams:
                        state.cams[cam] = new_cam(seq_base_us())
                for cam, st in state.cams.items():
                    if st.limit - st.next < st.block // 2 or st.durable < st.limit:
                        want[cam] = max(st.limit, st.next + st.block)
            if want and self.write(want):
                with state.lock:
                    self.made_durable(want)

    def reserve(self, cam: str) -> None:
        """``publish`` ran out of reserved seqs for ``cam``: reserve a bigger block now."""
        state = self.state
        with state.db_lock:
            with state.lock:
                st = state.cams.get(cam)
                if st is None:
                    st = state.cams[cam] = new_cam(seq_base_us())
                elif st.next < st.limit:
                    return  # another caller reserved meanwhile
                else:
                    st.block = min(SEQ_BLOCK_MAX, st.block * 4)
                want = st.next + st.block
            ok = state.commit.db_open and self.write({cam: want})
            with state.lock:
                # When the file cannot be written, hand seqs out anyway (a result must get
                # one); the round that commits them makes the reservation durable.
                st.limit = max(st.limit, want)
                if ok:
                    st.durable = max(st.durable, want)

    def write(self, want: dict[str, int]) -> bool:
        """Under ``db_lock``: store the next-free seqs ``want`` in a transaction of their own."""
        db = self.db
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
        """Under ``lock``: the durable next-free seq each camera needs after this round."""
        want: dict[str, int] = {}
        for cam, st in self.state.cams.items():
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

    def made_durable(self, want: dict[str, int]) -> None:
        """Under ``lock``: the next-free seqs ``want`` were committed."""
        cams = self.state.cams
        for cam, w in want.items():
            st = cams[cam]
            st.durable = max(st.durable, w)
            st.limit = max(st.limit, w)
