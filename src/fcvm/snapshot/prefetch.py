"""Prefetch threads: copy recorded working sets (and, at stop, everything) into VMs.

The server hands a VM's work over as an iterator of pieces (``chunks``: runs of a page
map cut to at most PREFETCH_CHUNK, coalesced so one UFFDIO_COPY covers up to 4 MiB);
``Prefetcher``'s threads take a VM's pieces in turn and copy them side by side, and
report back through ``notify`` (the server's main thread acts on it: "prefetched",
"drained", "gone"). Threads and their hand-off live here, apart from the fault path,
because their rules are different: they share a Peer with the main thread under its
lock, they must never close or drop anything themselves, and they run in parallel.

Why threads: UFFDIO_COPY is page allocation + memcpy, ~1 us per page on one core, and
``fcntl.ioctl`` drops the GIL (checked: a Python loop runs at full speed beside a 256
MiB UFFDIO_COPY), so two threads on two cores copy twice as fast while the main thread
answers faults meanwhile. Faults come first: the threads run at nice +PREFETCH_NICE so
the fault path and the VMs' vCPUs win the CPU when it is short. ``peer.busy`` counts
pieces in flight (the lock is not held while copying); the main thread waits for it to
reach 0 before it closes a uffd.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Callable, Iterator

from fcvm.log import get
from fcvm.snapshot import uffd
from fcvm.snapshot.faults import Peer
from fcvm.snapshot.handshake import PAGE, PAGE_SHIFT, Region
from fcvm.snapshot.source import MemorySource

log = get("snapshot.pageserver.prefetch")  # (a child: the server's log level applies)

PREFETCH_CHUNK = 4 << 20
PREFETCH_THREADS = 2
PREFETCH_NICE = 5  # prefetch threads yield the CPU to the fault path and the VMs
_MISSING_RUN = re.compile(b"\x00+")
_TOUCHED_RUN = re.compile(b"\x01+")

Piece = tuple[Region, int, int]  # (region, offset in region, length)


def chunks(peer: Peer, pages: bytes | bytearray) -> Iterator[Piece]:
    """(region, offset in region, length) pieces of `pages` (a 0/1 map of the memory
    file) that fall inside the peer's regions, each at most PREFETCH_CHUNK long."""
    for r in list(peer.regions):
        ps = r.page_size
        chunk = max(PREFETCH_CHUNK, ps)
        first, last = r.offset >> PAGE_SHIFT, (r.offset + r.size) >> PAGE_SHIFT
        for m in _TOUCHED_RUN.finditer(pages, first, last):
            lo = ((m.start() << PAGE_SHIFT) - r.offset) & -ps
            hi = min(r.size, -(-((m.end() << PAGE_SHIFT) - r.offset) // ps) * ps)
            for off in range(lo, hi, chunk):
                yield r, off, min(chunk, hi - off)


class Prefetcher:
    """`workers` threads copying VMs' pieces from `source`, one VM at a time in turn.

    counters/stats_lock: the server's (pages_prefetched is counted under the lock).
    copy_failed(peer, addr, errno): a piece failed for good. notify(what, peer): a VM's
    work is done ("prefetched"/"drained") or its memory is gone ("gone").
    """

    def __init__(
        self,
        source: MemorySource,
        workers: int,
        *,
        zero_pages: bool,
        counters: dict[str, int],
        stats_lock: threading.Lock,
        copy_failed: Callable[[Peer, int, int], None],
        notify: Callable[[str, Peer], None],
    ) -> None:
        self.source = source
        self.zero_pages = zero_pages
        self.counters = counters
        self.stats_lock = stats_lock
        self._copy_failed = copy_failed
        self._notify = notify
        self.cv = threading.Condition()
        self.queue: collections.deque[Peer] = collections.deque()
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._run, name=f"fcvm-prefetch-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, peer: Peer, work: Iterator[Piece]) -> None:
        """Make `work` the peer's (replacing what it had left) and queue it."""
        with peer.lock:
            peer.prefetch = work
            peer.again.clear()
            peer.queued = True
        self._queue(peer)

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        for t in self.threads:
            t.join(10)

    def _queue(self, peer: Peer) -> None:
        with self.cv:
            if peer not in self.queue:
                self.queue.append(peer)
            self.cv.notify_all()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # (per thread on Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
        res = uffd.Resolver()
        while True:
            with self.cv:
                while not self.queue and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                peer = self.queue[0]
            work = self._take(peer)
            if work is None:
                continue
            try:
                outcome = self._piece(peer, *work, res)
            except Exception:  # never let one VM's trouble stop prefetching for others
                log.exception("%s: prefetch failed", peer.label())
                outcome = "ok"
            self._done(peer, work, outcome)

    def _take(self, peer: Peer) -> Piece | None:
        """The peer's next piece (busy += 1), or None when it has none left to hand out
        (it leaves the queue; the last piece to finish reports it done)."""
        with peer.lock:
            work = None
            if peer.alive and peer.queued:
                if peer.again:
                    work = peer.again.pop()
                elif peer.prefetch is not None:
                    work = next(peer.prefetch, None)
            if work is not None:
                peer.busy += 1
                return work
            peer.prefetch = None
            with self.cv, contextlib.suppress(ValueError):
                self.queue.remove(peer)
            self._maybe_finished(peer)
            return None

    def _done(self, peer: Peer, work: Piece, outcome: str) -> None:
        if outcome == "again":
            time.sleep(0.001)  # let the main thread read the pending event first
        with peer.lock:
            peer.busy -= 1
            if outcome == "again" and peer.alive and peer.queued:
                peer.again.append(work)
                self._queue(peer)  # (it may have left the queue meanwhile)
            elif outcome == "gone" and peer.queued:
                peer.prefetch = None
                peer.again.clear()
                peer.queued = False
                self._notify("gone", peer)
            if not peer.busy:
                peer.idle.notify_all()
            self._maybe_finished(peer)

    def _maybe_finished(self, peer: Peer) -> None:
        """(peer.lock held) Report a peer whose work is all handed out and copied."""
        if peer.queued and not peer.busy and peer.prefetch is None and not peer.again:
            peer.queued = False
            if peer.alive:
                self._notify("drained" if peer.draining else "prefetched", peer)

    def _piece(self, peer: Peer, r: Region, off: int, length: int, res: uffd.Resolver) -> str:
        """Copy the still-missing pages of one piece (peer.busy counts it).
        Returns "ok", "again" (EAGAIN: redo later) or "gone"."""
        source = self.source
        view = source.view
        assert view is not None
        state = peer.state
        pg0 = (r.offset + off) >> PAGE_SHIFT
        for m in _MISSING_RUN.finditer(state, pg0, pg0 + (length >> PAGE_SHIFT)):
            pg, end = m.start(), m.end()
            if r.page_size > PAGE:  # whole huge pages only
                per = r.page_size >> PAGE_SHIFT
                pg = -(-(pg - pg0) // per) * per + pg0
                end = (end - pg0) // per * per + pg0
            while pg < end:
                foff = pg << PAGE_SHIFT
                dst = r.base + foff - r.offset
                nbytes = (end - pg) << PAGE_SHIFT
                if (
                    self.zero_pages
                    and r.page_size == PAGE
                    and source.zeros.startswith(view[foff : foff + nbytes])
                ):
                    done, err = res.zeropage(
                        peer.uffd, dst, nbytes, uffd.UFFDIO_ZEROPAGE_MODE_DONTWAKE
                    )
                else:
                    done, err = res.copy(
                        peer.uffd, dst, source.addr + foff, nbytes, uffd.UFFDIO_COPY_MODE_DONTWAKE
                    )
                k = done >> PAGE_SHIFT
                state[pg : pg + k] = b"\x01" * k
                with self.stats_lock:  # (prefetch threads count side by side)
                    peer.pages_prefetched += k
                    self.counters["pages_prefetched"] += k
                pg += k
                if not err:
                    continue
                if err == errno.EEXIST:
                    # A fault got there first, and faults copy whole blocks: skip the
                    # rest of that block and whatever the state map now says is in (one
                    # page at a time would cost an EEXIST ioctl per page of the block
                    # when a VM touching in order keeps catching up with the prefetch).
                    step = r.page_size >> PAGE_SHIFT
                    state[pg : pg + step] = b"\x01" * step
                    bp = r.block >> PAGE_SHIFT
                    base_pg = r.offset >> PAGE_SHIFT
                    pg = max(pg + step, base_pg + ((pg - base_pg) // bp + 1) * bp)
                    pg = state.find(0, pg, end) if pg < end else -1
                    if pg < 0:
                        break
                    if r.page_size > PAGE:  # (whole huge pages only)
                        pg = -(-(pg - pg0) // step) * step + pg0
                elif err == errno.EAGAIN:
                    return "again"
                elif err == errno.ESRCH:
                    return "gone"
                else:
                    self._copy_failed(peer, dst, err)
                    break
        return "ok"
