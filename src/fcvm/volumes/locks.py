"""POSIX record locks (fcntl F_SETLK/F_GETLK, and OFD locks, which the kernel sends the
same way with the open file as owner), kept by the server per inode.

The guest kernel forwards every lock request to us (FUSE_POSIX_LOCKS) and keeps no
record itself, so this table is the only truth: it splits and merges ranges per owner
exactly as the kernel does for a local file, answers F_GETLK with the holder's pid,
and queues F_SETLKW waiters, retried whenever a lock on that inode is released.
Owners are opaque 64-bit ids from the kernel (one per process for POSIX locks, one per
open file for OFD locks). Locks here are seen by the guest's processes only, not by
host processes locking the same file (see DESIGN.md, Volumes).

Ranges are inclusive [start, end]; end = OFFSET_MAX means "to the end of file".
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from dataclasses import dataclass

OFFSET_MAX = (1 << 63) - 1
RDLCK, WRLCK, UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


@dataclass(slots=True)
class Lock:
    owner: int
    start: int
    end: int
    type: int  # RDLCK or WRLCK
    pid: int
    fh: int  # the handle it was taken through, so RELEASE can drop OFD locks


@dataclass(slots=True)
class Waiter:
    unique: int
    nodeid: int
    lock: Lock


class TooManyLocks(Exception):
    """ENOLCK: the caps below keep a guest from growing the table without bound."""


class LockTable:
    def __init__(self, max_locks: int = 65536, max_waiters: int = 1024) -> None:
        self.max_locks = max_locks
        self.max_waiters = max_waiters
        self._locks: dict[int, list[Lock]] = {}
        self._count = 0
        self.waiters: list[Waiter] = []

    def __len__(self) -> int:
        return self._count

    def conflict(self, nodeid: int, req: Lock) -> Lock | None:
        for lk in self._locks.get(nodeid, ()):
            if (
                lk.owner != req.owner
                and lk.start <= req.end
                and req.start <= lk.end
                and (lk.type == WRLCK or req.type == WRLCK)
            ):
                return lk
        return None

    def apply(self, nodeid: int, req: Lock) -> None:
        """Set (or, with UNLCK, clear) req's range for its owner: the owner's existing
        locks over the range are cut away, the new one merged with touching locks of
        the same type, as fs/locks.c does. The caller checked conflict() first."""
        old = self._locks.get(nodeid, [])
        mine = [lk for lk in old if lk.owner == req.owner]
        others = [lk for lk in old if lk.owner != req.owner]
        kept: list[Lock] = []
        for lk in mine:
            if lk.end < req.start or lk.start > req.end:
                kept.append(lk)
                continue
            if lk.start < req.start:
                kept.append(Lock(lk.owner, lk.start, req.start - 1, lk.type, lk.pid, lk.fh))
            if lk.end > req.end:
                kept.append(Lock(lk.owner, req.end + 1, lk.end, lk.type, lk.pid, lk.fh))
        if req.type != UNLCK:
            new = Lock(req.owner, req.start, req.end, req.type, req.pid, req.fh)
            merged: list[Lock] = []
            for lk in kept:
                touches = lk.end + 1 >= new.start and new.end + 1 >= lk.start
                if lk.type == new.type and touches:
                    new.start = min(new.start, lk.start)
                    new.end = max(new.end, lk.end)
                else:
                    merged.append(lk)
            kept = [*merged, new]
        growth = len(kept) - len(mine)
        if growth > 0 and self._count + growth > self.max_locks:
            raise TooManyLocks
        self._count += growth
        result = others + kept
        if result:
            self._locks[nodeid] = result
        else:
            self._locks.pop(nodeid, None)

    def release_owner(self, nodeid: int, owner: int) -> bool:
        return self._drop(nodeid, lambda lk: lk.owner == owner)

    def release_fh(self, nodeid: int, fh: int) -> bool:
        return self._drop(nodeid, lambda lk: lk.fh == fh)

    def _drop(self, nodeid: int, pred: Callable[[Lock], bool]) -> bool:
        old = self._locks.get(nodeid)
        if not old:
            return False
        keep = [lk for lk in old if not pred(lk)]
        self._count -= len(old) - len(keep)
        if keep:
            self._locks[nodeid] = keep
        else:
            del self._locks[nodeid]
        return len(keep) != len(old)

    def held_by(self, nodeid: int) -> list[Lock]:
        return list(self._locks.get(nodeid, ()))
