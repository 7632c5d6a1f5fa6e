"""The userfaultfd page server: hands a snapshot's memory to VMs page by page.

This module is the server itself: the Unix socket and the one epoll loop, the life of
each connection (pending handshake -> attached VM -> gone) and of the server (open,
serve, drain at stop, close), and the working-set file. The work is done by:

    handshake.py  Firecracker's regions JSON + uffd: received, validated (Region)
    source.py     the memory file's read-only mapping, populated (UFFDIO_COPY's source)
    faults.py     per-VM page state (Peer) and fault resolution: the hot path
    prefetch.py   the threads copying working sets (and, at stop, everything) into VMs
    workingset.py the recorded first-touch sets on disk (merging a VM's in)

One thread runs the loop and answers faults; every fd's handler is called straight
from it (a VM's uffd handler is the closure faults.py builds). Faulted pages are
recorded; when a VM goes away its first-touch working set is merged into the
snapshot's ``workingset`` file, and later VMs get that set copied in by the prefetch
threads at connect.

A VM is gone when its process exits (pidfd from SO_PEERCRED's pid), or, when its pid
is not visible to us, when it closes the socket, or when the uffd reports HUP/ERR, or
an ioctl says its mm is gone (ESRCH). Bad handshakes are refused with a logged reason;
the server keeps serving everyone else.

On stop() with VMs still attached the server first "drains": it copies in every page
they have not received yet and unregisters their memory, so they keep running without
it (a VM whose handler disappears otherwise hangs at its next fault). A second stop()
exits at once.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcvm.log import get
from fcvm.snapshot import handshake, uffd, workingset
from fcvm.snapshot.faults import REMOVED, UNMAPPED, Faults, Peer
from fcvm.snapshot.handshake import PAGE, HandshakeError, Region
from fcvm.snapshot.prefetch import PREFETCH_CHUNK, PREFETCH_THREADS, Piece, Prefetcher, chunks
from fcvm.snapshot.source import MemorySource

__all__ = ["PageServer"]

log = get("snapshot.pageserver")

EPOLL_MAX_EVENTS = 64
_EPOLLIN = select.EPOLLIN


@dataclass
class _Pending:
    conn: socket.socket
    deadline: float


class PageServer:
    """Serve one memory file to any number of VMs over a Unix socket.

    block_size: bytes copied per fault (a power of two >= 4096; regions with larger
    pages use their page size). prefetch: copy the recorded working set in at connect.
    record: merge each VM's first-touch set into `workingset_path` when it goes away.
    """

    def __init__(
        self,
        memory: Path,
        socket_path: Path,
        *,
        block_size: int = PAGE,
        prefetch: bool = True,
        record: bool = True,
        workingset_path: Path | None = None,
        zero_pages: bool = True,
        handshake_timeout: float = 5.0,
        drain_timeout: float = 60.0,
        populate: bool = True,
        prefetch_threads: int = 0,
    ) -> None:
        if block_size < PAGE or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two >= {PAGE}: {block_size}")
        self.memory = Path(memory)
        self.socket_path = Path(socket_path)
        self.block_size = block_size
        self.prefetch_enabled = prefetch
        self.record = record
        self.workingset_path = workingset_path
        self.zero_pages = zero_pages
        self.handshake_timeout = handshake_timeout
        self.drain_timeout = drain_timeout
        # (0: one per CPU, at most PREFETCH_THREADS: two copy at twice one's rate here)
        self.prefetch_threads = prefetch_threads or max(
            1, min(PREFETCH_THREADS, os.cpu_count() or 1)
        )

        self.refusals: collections.deque[str] = collections.deque(maxlen=100)
        self.counters: dict[str, int] = collections.Counter(
            dict.fromkeys(
                ("peers_total", "refused", "faults", "pages_copied", "pages_zero",
                 "pages_prefetched", "events", "removes", "eexist", "copy_errors",
                 "workingset_saves"),
                0,
            )
        )  # fmt: skip
        # the longest run copied at once (a fault's block, a prefetch piece)
        longest = max(block_size, PREFETCH_CHUNK)
        self._source = MemorySource(self.memory, zeros_len=longest, populate=populate)
        self._faults = Faults(
            self._source,
            zero_pages=zero_pages,
            longest=longest,
            counters=self.counters,
            drop=self._drop,
            on_event=self._event,
        )
        self._ws: bytearray | None = None
        self._ep: select.epoll | None = None
        self._listener: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._pending: dict[int, _Pending] = {}
        self._peers: dict[int, Peer] = {}  # by uffd
        self._prefetcher: Prefetcher | None = None
        self._notices: collections.deque[tuple[str, Peer]] = collections.deque()
        self._next_ident = 1
        self._stop_requests = 0
        self._drain_deadline = 0.0
        self._stats_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Map the memory file, bind and listen. Separate from serve_forever so the
        caller can print the socket path only once it accepts connections."""
        self._source.open()
        if self.workingset_path is not None and self.prefetch_enabled:
            self._ws = workingset.load(self.workingset_path, self.memory)
            if self._ws is not None:
                log.info("prefetching %d recorded pages into each VM", workingset.count(self._ws))
        self._ep = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._add(self._wake_r, _EPOLLIN, self._on_wake)
        self._listener = _listen(self.socket_path)
        self._add(self._listener.fileno(), _EPOLLIN, self._on_accept)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer, "server stopping", quiet=True)
        for pend in list(self._pending.values()):
            pend.conn.close()
        self._pending.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        self._handlers.clear()
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
        self._source.close()

    def __enter__(self) -> PageServer:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Ask serve_forever to return (drains attached VMs first; twice: at once).
        Safe from a signal handler or another thread."""
        self._stop_requests += 1
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        assert self._ep is not None, "call open() first"
        poll = self._ep.poll
        handlers = self._handlers
        faults = self._faults
        while True:
            timeout: float = -1
            if self._stop_requests or faults.retrying or self._pending:
                if self._stop_requests and not self._begin_or_continue_drain():
                    return
                if faults.retrying:
                    timeout = 0.001
                elif self._pending:
                    first = min(p.deadline for p in self._pending.values())
                    timeout = max(0.0, first - time.monotonic())
            # (maxevents: the default, FD_SETSIZE - 1, mallocs 12 KiB of epoll_event per call)
            for fd, mask in poll(timeout, EPOLL_MAX_EVENTS):
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)
            if faults.retrying:
                faults.retry()
            if self._pending:
                self._expire_handshakes()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            peers = list(self._peers.values())
            return {
                "peers": len(peers),
                "peer_pids": sorted(p.pid for p in peers),
                "pending_handshakes": len(self._pending),
                "refusals": list(self.refusals),
                "workingset_pages": workingset.count(self._ws) if self._ws is not None else 0,
                **self.counters,
                "faults": self.counters["faults"] + sum(p.faults for p in peers),
                "pages_copied": self.counters["pages_copied"] + sum(p.pages_copied for p in peers),
                "pages_zero": self.counters["pages_zero"] + sum(p.pages_zero for p in peers),
            }

    # --- epoll plumbing --------------------------------------------------------------

    def _add(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        assert self._ep is not None
        self._ep.register(fd, mask)
        self._handlers[fd] = handler

    def _remove(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        if self._ep is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        while self._notices:
            what, peer = self._notices.popleft()
            if peer.uffd not in self._peers or self._peers[peer.uffd] is not peer:
                continue
            if what == "gone":
                self._drop(peer, "its memory is gone")
            elif what == "drained":
                self._finish_drain(peer)
            else:
                log.info("%s: prefetch done (%d pages)", peer.label(), peer.pages_prefetched)

    def _notify(self, what: str, peer: Peer) -> None:
        """From a prefetch thread: hand an outcome to the main thread."""
        self._notices.append((what, peer))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"n")

    # --- connections and handshakes --------------------------------------------------

    def _on_accept(self, mask: int) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            fd = conn.fileno()
            self._pending[fd] = _Pending(conn, time.monotonic() + self.handshake_timeout)
            self._add(fd, _EPOLLIN, self._handshake_handler(fd))

    def _handshake_handler(self, fd: int) -> Callable[[int], None]:
        return lambda mask: self._on_handshake(fd)

    def _on_handshake(self, fd: int) -> None:
        pend = self._pending.pop(fd)
        self._remove(fd)
        conn = pend.conn
        pid = handshake.peer_pid(conn)
        try:
            received = handshake.receive(conn, self._source.size)
        except HandshakeError as exc:
            self._refuse(conn, pid, str(exc))
            return
        if received is None:  # spurious wakeup
            self._pending[fd] = pend
            self._add(fd, _EPOLLIN, self._handshake_handler(fd))
            return
        ufd, regions = received
        self._attach(ufd, conn, pid, regions)

    def _refuse(self, conn: socket.socket, pid: int, reason: str) -> None:
        who = f"pid {pid}" if pid else "unknown peer"
        log.warning("refused connection from %s: %s", who, reason)
        self.refusals.append(reason)
        self.counters["refused"] += 1
        conn.close()

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        for fd, pend in list(self._pending.items()):
            if pend.deadline <= now:
                del self._pending[fd]
                self._remove(fd)
                reason = f"no handshake within {self.handshake_timeout:g} s"
                self._refuse(pend.conn, handshake.peer_pid(pend.conn), reason)

    # --- attached VMs ------------------------------------------------------------------

    def _attach(
        self,
        ufd: int,
        conn: socket.socket | None,
        pid: int,
        regions: list[Region],
        state: bytearray | None = None,
    ) -> Peer:
        npages = self._source.npages
        touched = bytearray(npages) if self.record else None
        for r in regions:
            r.block = max(self.block_size, r.page_size)
        peer = Peer(
            ident=self._next_ident,
            uffd=ufd,
            conn=conn,
            pid=pid,
            regions=regions,
            state=state if state is not None else bytearray(npages),
            touched=touched,
        )
        self._next_ident += 1
        self._peers[ufd] = peer
        self.counters["peers_total"] += 1
        self._add(ufd, _EPOLLIN, self._faults.handler(peer))
        if conn is not None:
            self._add(conn.fileno(), _EPOLLIN | select.EPOLLRDHUP, lambda m: self._on_conn(peer))
        if pid > 0:
            try:
                peer.pidfd = os.pidfd_open(pid)
            except OSError as exc:
                log.debug("pidfd_open(%d): %s; relying on the socket", pid, exc)
            else:
                self._add(peer.pidfd, _EPOLLIN, lambda m: self._drop(peer, "process exited"))
        total = sum(r.size for r in regions)
        log.info("%s attached: %d region(s), %d MiB", peer.label(), len(regions), total >> 20)
        if self._ws is not None and self.prefetch_enabled and state is None:
            self._submit(peer, chunks(peer, self._ws))
        return peer

    def _on_conn(self, peer: Peer) -> None:
        assert peer.conn is not None
        try:
            data = peer.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # Firecracker sends nothing after the handshake; ignore extras
        self._remove(peer.conn.fileno())
        peer.conn.close()
        peer.conn = None
        if peer.pidfd < 0:
            self._drop(peer, "closed its socket")

    def _event(self, peer: Peer, kind: int, a: int, b: int, c: int) -> None:
        """A uffd event other than a page fault (from the peer's uffd handler)."""
        self.counters["events"] += 1
        if kind == uffd.UFFD_EVENT_REMOVE:
            peer.removes += 1
            self.counters["removes"] += 1
            peer.mark(a, b, REMOVED)
        elif kind == uffd.UFFD_EVENT_UNMAP:
            peer.mark(a, b, UNMAPPED)
        elif kind == uffd.UFFD_EVENT_REMAP:
            peer.regions = handshake.remap(peer.regions, a, b, c)
            for r in peer.regions:
                r.block = max(self.block_size, r.page_size)
            self._handlers[peer.uffd] = self._faults.handler(peer)
            log.debug("%s: remap %#x -> %#x (+%#x)", peer.label(), a, b, c)
        elif kind == uffd.UFFD_EVENT_FORK:
            child = a & 0xFFFFFFFF
            log.info("%s forked; serving the child's userfaultfd %d too", peer.label(), child)
            regions = [Region(r.base, r.size, r.offset, r.page_size) for r in peer.regions]
            # (_attach sets each region's block size)
            self._attach(child, None, 0, regions, state=bytearray(peer.state))
        else:
            log.warning("%s: unexpected userfaultfd event %#x", peer.label(), kind)

    def _drop(self, peer: Peer, why: str, *, quiet: bool = False) -> None:
        with self._stats_lock:  # stats() never sees a peer both or neither counted
            if self._peers.pop(peer.uffd, None) is None:
                return
            self.counters["faults"] += peer.faults
            self.counters["pages_copied"] += peer.pages_copied
            self.counters["pages_zero"] += peer.pages_zero
        peer.alive = False
        with peer.lock:  # no prefetch thread is using the uffd now, nor will one
            while peer.busy:
                peer.idle.wait()
            self._remove(peer.uffd)
            os.close(peer.uffd)
        if peer.conn is not None:
            self._remove(peer.conn.fileno())
            peer.conn.close()
        if peer.pidfd >= 0:
            self._remove(peer.pidfd)
            os.close(peer.pidfd)
        if peer in self._faults.retrying:
            self._faults.retrying.remove(peer)
        (log.debug if quiet else log.info)(
            "%s gone (%s): %d faults, %d pages served, %d prefetched, %.1f s",
            peer.label(),
            why,
            peer.faults,
            peer.pages_copied + peer.pages_zero,
            peer.pages_prefetched,
            time.monotonic() - peer.started,
        )
        self._merge_workingset(peer)

    def _merge_workingset(self, peer: Peer) -> None:
        if peer.touched is None or self.workingset_path is None:
            return
        merged = workingset.merge(self.workingset_path, self.memory, self._ws, peer.touched)
        if merged is None:
            return
        if self.prefetch_enabled:
            self._ws = merged
        self.counters["workingset_saves"] += 1

    # --- prefetch and draining ---------------------------------------------------------

    def _submit(self, peer: Peer, work: Iterator[Piece]) -> None:
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(
                self._source,
                self.prefetch_threads,
                zero_pages=self.zero_pages,
                counters=self.counters,
                stats_lock=self._stats_lock,
                copy_failed=self._faults.copy_failed,
                notify=self._notify,
            )
            self._prefetcher.start()
        self._prefetcher.submit(peer, work)  # (queues it unless it is in the queue already)

    def _begin_or_continue_drain(self) -> bool:
        """True while attached VMs are still being filled in before exit."""
        if self._stop_requests > 1 or not self._peers:
            return False
        now = time.monotonic()
        if not self._drain_deadline:
            self._drain_deadline = now + self.drain_timeout
            if self._listener is not None:
                self._remove(self._listener.fileno())
            log.info("stopping: filling in the memory of %d attached VM(s) first", len(self._peers))
            everything = b"\x01" * self._source.npages
            for peer in list(self._peers.values()):
                peer.draining = True
                self._submit(peer, chunks(peer, everything))
        elif now > self._drain_deadline:
            log.warning("drain timed out; %d VM(s) may hang at their next fault", len(self._peers))
            return False
        return True

    def _finish_drain(self, peer: Peer) -> None:
        """Everything is in: unregister the VM's memory so it never needs us again."""
        for r in peer.regions:
            try:
                uffd.unregister(peer.uffd, r.base, r.size)
            except OSError as exc:
                log.warning("%s: unregister %#x failed: %s", peer.label(), r.base, exc)
        self._drop(peer, "drained")


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a dead server
        else:
            raise OSError(errno.EADDRINUSE, f"{path} is already being served")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    sock.setblocking(False)
    return sock
