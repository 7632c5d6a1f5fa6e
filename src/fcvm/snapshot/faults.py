"""Per-VM fault serving: a VM's page state, and the resolution of its page faults.

A Peer is one attached VM: its regions, a byte per 4 KiB page of the memory file (0
missing, 1 present, 2 removed: later faults get zeros, 3 unmapped), the pages it
touched first (its working set), counters, and the fields the prefetch threads
coordinate on. Faults resolves a VM's faults from the MemorySource; the server owns the
VMs' lifecycle and their non-fault events and is reached through two callbacks (drop a
VM, handle an event), so this module never sees sockets or epoll.

Why it is shaped this way: page at a time is the Python server's weak spot (each fault
is a round trip, and every bytecode adds to it). So a VM's uffd handler is a closure
(``Faults.handler``) that binds everything a data-page fault needs to locals, reads up
to READ_EVENTS messages per read() into a preallocated buffer, and answers a missing
data page with ``fcntl.ioctl`` on a prebuilt UFFDIO_COPY argument of which only dst and
src are rewritten: no objects, no attribute lookups per fault. Everything else (events,
blocks, zero or present or removed pages, ioctl errors) takes the general path
(``fault``), which copies the aligned block around the fault in one ioctl and handles
every errno. Keep the closure as it is: its shape is measured, not incidental.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fcvm.log import get
from fcvm.snapshot import uffd
from fcvm.snapshot.handshake import PAGE, PAGE_SHIFT, Region
from fcvm.snapshot.source import MemorySource
from fcvm.snapshot.uffd import MSG, MSG_SIZE, UFFD_EVENT_PAGEFAULT, UFFDIO_COPY

log = get("snapshot.pageserver.faults")  # (a child: the server's log level applies)

READ_EVENTS = 64  # uffd_msgs per read()
# Peer.state values
MISSING, PRESENT, REMOVED, UNMAPPED = 0, 1, 2, 3

_MSG_UNPACK_FROM = MSG.unpack_from
# The page-at-a-time UFFDIO_COPY argument is prebuilt (len = PAGE, mode 0) and only its
# dst and src are rewritten per fault; `copy` is output only (the kernel never reads it).
_SRC_DST_PACK = struct.Struct("=QQ").pack_into
_ioctl = fcntl.ioctl
_EPOLLBAD = select.EPOLLHUP | select.EPOLLERR


@dataclass(eq=False)
class Peer:
    """One attached VM (its uffd, connection, memory state, counters)."""

    ident: int
    uffd: int
    conn: socket.socket | None
    pid: int
    regions: list[Region]
    state: bytearray
    touched: bytearray | None
    pidfd: int = -1
    # readinto() of the uffd (a FileIO that does not own it): None when nothing is pending
    readinto: Callable[[bytearray], int | None] = field(init=False, repr=False)
    # Prefetch/drain work, handed out piece by piece to the prefetch threads under
    # `lock`; `busy` counts pieces being copied (the lock is not held meanwhile). The
    # main thread clears `alive` and waits (`idle`) for busy == 0 before it closes the uffd.
    prefetch: Iterator[tuple[Region, int, int]] | None = None
    again: list[tuple[Region, int, int]] = field(default_factory=list)
    queued: bool = False
    draining: bool = False
    alive: bool = True
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    idle: threading.Condition = field(init=False)
    retry: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    faults: int = 0
    pages_copied: int = 0
    pages_zero: int = 0
    pages_prefetched: int = 0
    removes: int = 0

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)
        self.readinto = io.FileIO(self.uffd, "rb", closefd=False).readinto

    def label(self) -> str:
        return f"vm#{self.ident} (pid {self.pid or '?'})"

    def mark(self, start: int, end: int, value: int) -> None:
        """Set the state of the pages behind addresses [start, end) to `value`."""
        for r in self.regions:
            lo, hi = max(start, r.base), min(end, r.base + r.size)
            if lo >= hi:
                continue
            pg = (r.offset + lo - r.base) >> PAGE_SHIFT
            last = (r.offset + hi - r.base + PAGE - 1) >> PAGE_SHIFT
            self.state[pg:last] = bytes([value]) * (last - pg)


class Faults:
    """Resolves the faults of every attached VM from one memory source.

    longest: the most bytes marked present at once (at least the block size).
    counters: the server's counters (this adds eexist, copy_errors, faults_outside).
    drop(peer, why): the VM is gone. on_event(peer, kind, a, b, c): a non-fault uffd event.
    """

    def __init__(
        self,
        source: MemorySource,
        *,
        zero_pages: bool,
        longest: int,
        counters: dict[str, int],
        drop: Callable[[Peer, str], None],
        on_event: Callable[[Peer, int, int, int, int], None],
    ) -> None:
        self.source = source
        self.zero_pages = zero_pages
        self.counters = counters
        self.retrying: list[Peer] = []  # peers with faults to retry after EAGAIN
        self._drop = drop
        self._on_event = on_event
        self._res = uffd.Resolver()
        self._copy_buf = bytearray(uffd.COPY.pack(0, 0, PAGE, 0, 0))
        self._rbuf = bytearray(MSG_SIZE * READ_EVENTS)
        self._ones = b"\x01" * (longest // PAGE)

    # --- the hot path ------------------------------------------------------------------

    def handler(self, peer: Peer) -> Callable[[int], None]:
        """The epoll handler of a peer's uffd: a closure holding in locals all that a
        page-at-a-time fault needs (the fault path is the Python server's cost: a round
        trip on one CPU costs C ~4 us, and every bytecode here adds to it). Anything
        else - events, blocks, zero pages, pages already present, ioctl errors - goes to
        _on_msg. Rebuild it when the peer's regions change (REMAP)."""
        buf = self._rbuf
        readinto = peer.readinto
        unpack_from = _MSG_UNPACK_FROM
        pack_into = _SRC_DST_PACK
        ioctl = _ioctl
        cbuf = self._copy_buf
        ufd = peer.uffd
        state = peer.state
        touched = peer.touched if peer.touched is not None else bytearray(self.source.npages)
        view = self.source.view
        assert view is not None
        zeros = self.source.zeros
        check_zero = self.zero_pages
        src = self.source.addr
        spans = tuple((r.base, r.size, r.offset) for r in peer.regions if r.block == PAGE)
        on_msg = self._on_msg
        fault, copy, bad, mask_ = UFFD_EVENT_PAGEFAULT, UFFDIO_COPY, _EPOLLBAD, -PAGE
        size = len(buf)

        def on_uffd(mask: int) -> None:
            while True:
                try:
                    n = readinto(buf)  # None: nothing pending (EAGAIN)
                except OSError as exc:
                    self._drop(peer, f"reading its userfaultfd failed: {exc}")
                    return
                if not n:
                    if mask & bad:
                        self._drop(peer, "userfaultfd hung up")
                    return
                for i in range(0, n - n % MSG_SIZE, MSG_SIZE):
                    kind, a, addr, c = unpack_from(buf, i)
                    if kind == fault:
                        for base, length, offset in spans:
                            rel = addr - base
                            if 0 <= rel < length:
                                rel &= mask_
                                foff = offset + rel
                                pg = foff >> PAGE_SHIFT
                                if (
                                    state[pg]
                                    or (
                                        check_zero
                                        # (two byte reads reject most data pages first)
                                        and not view[foff]
                                        and not view[foff + PAGE - 1]
                                        and zeros.startswith(view[foff : foff + PAGE])
                                    )
                                ):
                                    break
                                pack_into(cbuf, 0, base + rel, src + foff)  # len PAGE, mode 0
                                try:
                                    ioctl(ufd, copy, cbuf, True)
                                except OSError:
                                    break
                                state[pg] = 1
                                touched[pg] = 1
                                peer.faults += 1
                                peer.pages_copied += 1
                                kind = 0
                                break
                        if not kind:
                            continue
                    on_msg(peer, kind, a, addr, c)  # (redoes a failed copy, then handles it)
                    if not peer.alive:
                        return
                if peer.retry and peer not in self.retrying:
                    self.retrying.append(peer)
                if n < size or not peer.alive:
                    return

        return on_uffd

    # --- the general path --------------------------------------------------------------

    def _on_msg(self, peer: Peer, kind: int, a: int, b: int, c: int) -> None:
        if kind == UFFD_EVENT_PAGEFAULT:
            self.fault(peer, b)
        else:
            self._on_event(peer, kind, a, b, c)

    def fault(self, peer: Peer, addr: int) -> None:
        """Resolve one missing-page fault with the block around it (the general path;
        page-at-a-time faults of data pages take the fast path in `handler`)."""
        for r in peer.regions:
            rel = addr - r.base
            if 0 <= rel < r.size:
                break
        else:
            self.counters["faults_outside"] += 1
            log.warning("%s: fault at %#x outside its regions", peer.label(), addr)
            return
        peer.faults += 1
        bs = r.block
        rel &= -bs
        foff = r.offset + rel
        pg = foff >> PAGE_SHIFT
        state = peer.state
        length = bs if rel + bs <= r.size else r.size - rel
        n = length >> PAGE_SHIFT
        if state.count(0, pg, pg + n) != n:
            self._fault_page(peer, r, addr)
            return
        dst = r.base + rel
        source = self.source
        assert source.view is not None
        if (
            self.zero_pages
            and r.page_size == PAGE
            and source.zeros.startswith(source.view[foff : foff + length])
        ):
            done, err = self._res.zeropage(peer.uffd, dst, length)
            if not err:
                peer.pages_zero += n
        else:
            done, err = self._res.copy(peer.uffd, dst, source.addr + foff, length)
            if not err:
                peer.pages_copied += n
        if err:
            self._fault_failed(peer, r, addr, pg, done, err)
            return
        state[pg : pg + n] = self._ones[:n]
        if peer.touched is not None:
            peer.touched[pg : pg + n] = self._ones[:n]

    def _fault_failed(self, peer: Peer, r: Region, addr: int, pg: int, done: int, err: int) -> None:
        if done:
            k = done >> PAGE_SHIFT
            peer.state[pg : pg + k] = self._ones[:k]
        if err == errno.EAGAIN:
            peer.retry.append(addr)
        elif err == errno.ESRCH:
            self._drop(peer, "its memory is gone")
        elif err == errno.EEXIST:
            self._fault_page(peer, r, addr)
        else:
            self.copy_failed(peer, addr, err)

    def _fault_page(self, peer: Peer, r: Region, addr: int) -> None:
        """Slow path: one page, honouring removed/present state."""
        ps = r.page_size
        rel = (addr - r.base) & -ps
        dst = r.base + rel
        foff = r.offset + rel
        pg = foff >> PAGE_SHIFT
        n = ps >> PAGE_SHIFT
        state = peer.state
        if REMOVED in state[pg : pg + n]:
            if ps == PAGE:
                _, err = self._res.zeropage(peer.uffd, dst, ps)
            else:  # hugetlbfs has no ZEROPAGE: copy zeros
                _, err = self._res.copy(peer.uffd, dst, self.source.zero_source(ps), ps)
            kind = "pages_zero"
        else:
            _, err = self._res.copy(peer.uffd, dst, self.source.addr + foff, ps)
            kind = "pages_copied"
        if not err:
            state[pg : pg + n] = self._ones[:n]
            if peer.touched is not None:
                peer.touched[pg : pg + n] = self._ones[:n]
            if kind == "pages_zero":
                peer.pages_zero += n
            else:
                peer.pages_copied += n
        elif err == errno.EEXIST:
            # Already there (a racing fault, or a block/prefetch copy): wake the waiter.
            state[pg : pg + n] = self._ones[:n]
            self.counters["eexist"] += 1
            with contextlib.suppress(OSError):
                uffd.wake(peer.uffd, dst, ps)
        elif err == errno.EAGAIN:
            peer.retry.append(addr)
        elif err == errno.ESRCH:
            self._drop(peer, "its memory is gone")
        else:
            self.copy_failed(peer, addr, err)

    def copy_failed(self, peer: Peer, addr: int, err: int) -> None:
        """Count and log a resolution that failed for good (also from prefetch threads)."""
        if not peer.alive:
            return
        # ENOENT/EFAULT: the range is no longer mapped (munmap raced the fault).
        self.counters["copy_errors"] += 1
        log.warning(
            "%s: resolving the fault at %#x failed: %s", peer.label(), addr, os.strerror(err)
        )

    def retry(self) -> None:
        """Faults that met EAGAIN (the mapping was changing): try them again."""
        peers, self.retrying = self.retrying, []
        for peer in peers:
            pending, peer.retry = peer.retry, []
            for addr in pending:
                if not peer.alive:
                    break
                self.fault(peer, addr)
            if peer.retry and peer.alive:
                self.retrying.append(peer)
