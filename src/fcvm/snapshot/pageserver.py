"""The userfaultfd page server: hands a snapshot's memory to VMs page by page.

Protocol (Firecracker's `mem_backend: {backend_type: Uffd}`, see
docs/snapshotting/handling-page-faults-on-snapshot-resume.md): the VMM connects to our
Unix socket and sends, in one message, a JSON array of regions
``{base_host_virt_addr, size, offset, page_size}`` with its userfaultfd as SCM_RIGHTS,
then keeps the socket open and never writes to it again. From then on every first
touch of a guest page is a UFFD_EVENT_PAGEFAULT that we answer with UFFDIO_COPY from
the memory file (UFFDIO_ZEROPAGE when the source is all zeros).

One thread, one epoll set. Per VM (a "peer") we keep a byte per page of the memory
file: 0 missing, 1 present, 2 removed (UFFD_EVENT_REMOVE: later faults get zeros), 3
unmapped. Block serving copies the aligned block around the fault in one ioctl.
Faulted blocks are recorded; when a VM goes away its first-touch working set is merged
into the snapshot's ``workingset`` file, and later VMs get that set copied in eagerly at
connect time (in chunks, between fault events, so faults are never starved).

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
import ctypes
import errno
import fcntl
import io
import itertools
import json
import mmap
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcvm.log import get
from fcvm.snapshot import uffd, workingset
from fcvm.snapshot.uffd import (
    MSG,
    MSG_SIZE,
    UFFD_EVENT_FORK,
    UFFD_EVENT_PAGEFAULT,
    UFFD_EVENT_REMAP,
    UFFD_EVENT_REMOVE,
    UFFD_EVENT_UNMAP,
    UFFDIO_COPY,
)

log = get("snapshot.pageserver")

PAGE = 4096
PAGE_SHIFT = 12
MAX_HANDSHAKE = 64 * 1024
MAX_FDS = 8
PREFETCH_CHUNK = 4 << 20
PREFETCH_THREADS = 2
PREFETCH_NICE = 5  # prefetch threads yield the CPU to the fault path and the VMs
POPULATE_CHUNK = 64 << 20
MADV_POPULATE_READ = 22  # Linux 5.14+
READ_EVENTS = 64
EPOLL_MAX_EVENTS = 64
# peer.state values
MISSING, PRESENT, REMOVED, UNMAPPED = 0, 1, 2, 3
_MISSING_RUN = re.compile(b"\x00+")
_TOUCHED_RUN = re.compile(b"\x01+")
_UCRED = struct.Struct("3i")

_MSG_UNPACK_FROM = MSG.unpack_from
# The page-at-a-time UFFDIO_COPY argument is prebuilt (len = PAGE, mode 0) and only its
# dst and src are rewritten per fault; `copy` is output only (the kernel never reads it).
_SRC_DST_PACK = struct.Struct("=QQ").pack_into
_ioctl = fcntl.ioctl
_EPOLLIN = select.EPOLLIN
_EPOLLBAD = select.EPOLLHUP | select.EPOLLERR


class HandshakeError(Exception):
    """A connection's handshake is unacceptable; the message is the logged reason."""


@dataclass(slots=True)
class Region:
    """One guest memory region as the VMM sees it (host virtual addresses)."""

    base: int
    size: int
    offset: int  # in the memory file
    page_size: int
    block: int = field(default=0, compare=False)  # bytes served per fault (set at attach)

    @property
    def end(self) -> int:
        return self.base + self.size


def parse_regions(payload: bytes, file_size: int) -> list[Region]:
    """Validate Firecracker's handshake JSON against a memory file of file_size bytes."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandshakeError(f"malformed JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        raise HandshakeError("expected a non-empty JSON array of memory regions")
    regions = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise HandshakeError(f"region {i} is not a JSON object")

        def num(key: str, item: dict[str, Any] = item, i: int = i) -> int:
            value = item.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HandshakeError(f"region {i}: {key!r} missing or not a non-negative integer")
            return value

        base, size, offset = num("base_host_virt_addr"), num("size"), num("offset")
        # page_size is in bytes; page_size_kib is its deprecated alias (also bytes in
        # current Firecracker, KiB in old ones); absent in the oldest: 4 KiB.
        if "page_size" in item:
            page_size = num("page_size")
        elif "page_size_kib" in item:
            page_size = num("page_size_kib")
            if page_size < PAGE:
                page_size *= 1024
        else:
            page_size = PAGE
        if page_size < PAGE or page_size & (page_size - 1) or page_size > 1 << 30:
            raise HandshakeError(f"region {i}: unsupported page size {page_size}")
        if size == 0 or size % page_size or base % page_size or offset % page_size:
            raise HandshakeError(
                f"region {i}: base, size and offset must be multiples of the page size "
                f"{page_size} (base {base:#x}, size {size:#x}, offset {offset:#x})"
            )
        if base + size > 1 << 64:
            raise HandshakeError(f"region {i}: address range overflows")
        if offset + size > file_size:
            raise HandshakeError(
                f"region {i} (offset {offset:#x}, size {size:#x}) lies beyond the memory "
                f"file ({file_size:#x} bytes)"
            )
        regions.append(Region(base, size, offset, page_size))
    for key in ("base", "offset"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.size) for r in regions)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                what = "addresses" if key == "base" else "memory file ranges"
                raise HandshakeError(f"regions overlap ({what})")
    regions.sort(key=lambda r: r.base)
    return regions


@dataclass(eq=False)
class _Peer:
    ident: int
    uffd: int
    conn: socket.socket | None
    pid: int
    regions: list[Region]
    state: bytearray
    touched: bytearray | None
    pidfd: int = -1
    # readinto() of the uffd (a FileIO that does not own it): None when nothing is pending
    readinto: Callable[[bytearray], int | None] = field(default=lambda buf: None, repr=False)
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
    pages_served: int = 0
    pages_copied: int = 0
    pages_zero: int = 0
    pages_prefetched: int = 0
    removes: int = 0

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    def label(self) -> str:
        return f"vm#{self.ident} (pid {self.pid or '?'})"


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
        self.populate = populate
        # (0: one per CPU, at most PREFETCH_THREADS: two copy at twice one's rate here)
        self.prefetch_threads = prefetch_threads or max(
            1, min(PREFETCH_THREADS, os.cpu_count() or 1)
        )
        self._populator: threading.Thread | None = None
        self._populate_stop = threading.Event()

        self.file_size = 0
        self.npages = 0
        self._addr = 0  # the memory file's read-only mapping
        self._zero_addr = self._zero_len = 0
        self._view: memoryview | None = None
        self._zeros = b""  # (bytes.startswith(view) is a memcmp; view == view is ~40x slower)
        self._ws: bytearray | None = None
        self._ep: select.epoll | None = None
        self._listener: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._pending: dict[int, _Pending] = {}
        self._peers: dict[int, _Peer] = {}  # by uffd
        self._retrying: list[_Peer] = []  # peers with faults to retry after EAGAIN
        self._prefetcher: _Prefetcher | None = None
        self._notices: collections.deque[tuple[str, _Peer]] = collections.deque()
        self._next_ident = 1
        self._stop_requests = 0
        self._drain_deadline = 0.0
        self._res = uffd.Resolver()
        self._copy_buf = bytearray(uffd.COPY.pack(0, 0, PAGE, 0, 0))
        self._rbuf = bytearray(MSG_SIZE * READ_EVENTS)
        self._stats_lock = threading.Lock()
        self._ones = b"\x01" * (max(block_size, PREFETCH_CHUNK) // PAGE)
        self.refusals: collections.deque[str] = collections.deque(maxlen=100)
        self.counters: dict[str, int] = collections.Counter(
            dict.fromkeys(
                ("peers_total", "refused", "pages_copied", "pages_zero", "pages_prefetched",
                 "events", "removes", "eexist", "copy_errors", "workingset_saves"),
                0,
            )
        )  # fmt: skip

    # --- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Map the memory file, bind and listen. Separate from serve_forever so the
        caller can print the socket path only once it accepts connections."""
        self._map_memory()
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
        self._unmap_memory()

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
        while True:
            timeout: float = -1
            if self._stop_requests or self._retrying or self._pending:
                if self._stop_requests and not self._begin_or_continue_drain():
                    return
                if self._retrying:
                    timeout = 0.001
                elif self._pending:
                    first = min(p.deadline for p in self._pending.values())
                    timeout = max(0.0, first - time.monotonic())
            # (maxevents: the default, FD_SETSIZE - 1, mallocs 12 KiB of epoll_event per call)
            for fd, mask in poll(timeout, EPOLL_MAX_EVENTS):
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)
            if self._retrying:
                self._retry_faults()
            if self._pending:
                self._expire_handshakes()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        return {
            "peers": len(self._peers),
            "peer_pids": sorted(p.pid for p in list(self._peers.values())),
            "pending_handshakes": len(self._pending),
            "refusals": list(self.refusals),
            "workingset_pages": workingset.count(self._ws) if self._ws is not None else 0,
            **self.counters,
            "pages_copied": self.counters["pages_copied"]
            + sum(p.pages_copied for p in list(self._peers.values())),
            "pages_zero": self.counters["pages_zero"]
            + sum(p.pages_zero for p in list(self._peers.values())),
        }

    # --- memory file -----------------------------------------------------------------

    def _map_memory(self) -> None:
        fd = os.open(self.memory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % PAGE:
                raise ValueError(f"{self.memory}: size {size} is not a non-zero multiple of 4 KiB")
            libc = _libc()
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise OSError(err, f"mmap {self.memory}: {os.strerror(err)}")
        finally:
            os.close(fd)
        self._addr = int(addr)
        self.file_size = size
        self.npages = size // PAGE
        self._view = memoryview((ctypes.c_ubyte * size).from_address(self._addr)).cast("B")
        self._zeros = bytes(max(self.block_size, PREFETCH_CHUNK))
        if self.populate:
            self._populate_stop.clear()
            self._populator = threading.Thread(
                target=self._populate_source, name="fcvm-populate", daemon=True
            )
            self._populator.start()

    def _populate_source(self) -> None:
        """Fill in our read-only mapping's page table (MADV_POPULATE_READ), beside serving.

        UFFDIO_COPY reads its source with page faults disabled; a source page not yet
        mapped here makes the kernel drop its locks, fault it in and retry, which costs
        ~0.2-0.4 us per 4 KiB page on these hosts (UFFDIO_COPY of 4 MiB: 1.4 us/page from
        a fresh mapping, 1.05-1.2 us/page from a populated one). Reads the file into the
        page cache where it is not yet (which the VMs would need anyway)."""
        libc = _libc()
        addr, size = self._addr, self.file_size
        t0 = time.monotonic()
        for off in range(0, size, POPULATE_CHUNK):
            if self._populate_stop.is_set():
                return
            n = min(POPULATE_CHUNK, size - off)
            if libc.madvise(ctypes.c_void_p(addr + off), ctypes.c_size_t(n), MADV_POPULATE_READ):
                err = ctypes.get_errno()
                log.debug("MADV_POPULATE_READ of the memory file: %s", os.strerror(err))
                return
        log.debug("memory file mapping populated in %.3f s", time.monotonic() - t0)

    def _unmap_memory(self) -> None:
        if self._populator is not None:
            self._populate_stop.set()
            self._populator.join()
            self._populator = None
        if self._addr:
            if self._view is not None:
                self._view.release()
                self._view = None
            _libc().munmap(ctypes.c_void_p(self._addr), self.file_size)
            self._addr = 0
        if self._zero_addr:
            _libc().munmap(ctypes.c_void_p(self._zero_addr), self._zero_len)
            self._zero_addr = self._zero_len = 0

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

    def _notify(self, what: str, peer: _Peer) -> None:
        """From the prefetch thread: hand an outcome to the main thread."""
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
        pid = _peer_pid(conn)
        fds: list[int] = []
        try:
            try:
                msg, fds, flags, _ = socket.recv_fds(conn, MAX_HANDSHAKE, MAX_FDS)
            except BlockingIOError:  # spurious wakeup
                self._pending[fd] = pend
                self._add(fd, _EPOLLIN, self._handshake_handler(fd))
                return
            except OSError as exc:
                raise HandshakeError(f"receiving the handshake failed: {exc}") from None
            if flags & socket.MSG_CTRUNC:
                raise HandshakeError("too many descriptors in the handshake")
            if not msg and not fds:
                raise HandshakeError("closed the connection without sending its memory regions")
            if len(fds) != 1:
                raise HandshakeError(
                    f"expected exactly one userfaultfd as SCM_RIGHTS, got {len(fds)} descriptors"
                )
            if not uffd.is_userfaultfd(fds[0]):
                raise HandshakeError("the descriptor sent is not a userfaultfd")
            if len(msg) >= MAX_HANDSHAKE:
                raise HandshakeError(f"handshake larger than {MAX_HANDSHAKE} bytes")
            regions = parse_regions(msg, self.file_size)
        except HandshakeError as exc:
            for extra in fds:
                os.close(extra)
            self._refuse(conn, pid, str(exc))
            return
        self._attach(fds[0], conn, pid, regions)

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
                self._refuse(pend.conn, _peer_pid(pend.conn), reason)

    def _attach(
        self,
        ufd: int,
        conn: socket.socket | None,
        pid: int,
        regions: list[Region],
        state: bytearray | None = None,
    ) -> _Peer:
        touched = bytearray(self.npages) if self.record else None
        for r in regions:
            r.block = max(self.block_size, r.page_size)
        peer = _Peer(
            ident=self._next_ident,
            uffd=ufd,
            conn=conn,
            pid=pid,
            regions=regions,
            state=state if state is not None else bytearray(self.npages),
            touched=touched,
        )
        peer.readinto = io.FileIO(ufd, "rb", closefd=False).readinto
        self._next_ident += 1
        self._peers[ufd] = peer
        self.counters["peers_total"] += 1
        self._add(ufd, _EPOLLIN, self._uffd_handler(peer))
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
            self._submit(peer, self._chunks(peer, self._ws))
        return peer

    def _on_conn(self, peer: _Peer) -> None:
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

    def _drop(self, peer: _Peer, why: str, *, quiet: bool = False) -> None:
        with self._stats_lock:  # stats() never sees a peer both or neither counted
            if self._peers.pop(peer.uffd, None) is None:
                return
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
        if peer in self._retrying:
            self._retrying.remove(peer)
        peer.pages_served = peer.pages_copied + peer.pages_zero
        (log.debug if quiet else log.info)(
            "%s gone (%s): %d faults, %d pages served, %d prefetched, %.1f s",
            peer.label(),
            why,
            peer.faults,
            peer.pages_served,
            peer.pages_prefetched,
            time.monotonic() - peer.started,
        )
        self._merge_workingset(peer)

    def _merge_workingset(self, peer: _Peer) -> None:
        if peer.touched is None or self.workingset_path is None:
            return
        if workingset.count(peer.touched) == 0:
            return
        old = self._ws
        if old is None:
            old = workingset.load(self.workingset_path, self.memory)
        merged = peer.touched if old is None else workingset.union(old, peer.touched)
        if old is not None and merged == old:
            return
        try:
            workingset.save(self.workingset_path, self.memory, merged)
        except OSError as exc:
            log.warning("cannot save working set %s: %s", self.workingset_path, exc)
            return
        if self.prefetch_enabled:
            self._ws = merged
        self.counters["workingset_saves"] += 1

    # --- faults and events: the hot path ---------------------------------------------

    def _uffd_handler(self, peer: _Peer) -> Callable[[int], None]:
        """The epoll handler of a peer's uffd: a closure holding in locals all that a
        page-at-a-time fault needs (the fault path is the Python server's cost: a round
        trip costs C ~5 us, and every bytecode here adds to it). Anything else - events,
        blocks, zero pages, pages already present, ioctl errors - goes to _on_msg.
        Rebuilt when the peer's regions change (REMAP)."""
        buf = self._rbuf
        readinto = peer.readinto
        unpack_from = _MSG_UNPACK_FROM
        pack_into = _SRC_DST_PACK
        ioctl = _ioctl
        cbuf = self._copy_buf
        ufd = peer.uffd
        state = peer.state
        touched = peer.touched if peer.touched is not None else bytearray(self.npages)
        view = self._view
        assert view is not None
        zeros = self._zeros
        check_zero = self.zero_pages
        src = self._addr
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
                if peer.retry and peer not in self._retrying:
                    self._retrying.append(peer)
                if n < size or not peer.alive:
                    return

        return on_uffd

    def _on_msg(self, peer: _Peer, kind: int, a: int, b: int, c: int) -> None:
        if kind == UFFD_EVENT_PAGEFAULT:
            self._fault(peer, b)
        else:
            self._event(peer, kind, a, b, c)

    def _fault(self, peer: _Peer, addr: int) -> None:
        """Resolve one missing-page fault with the block around it (the general path;
        page-at-a-time faults of data pages take the fast path in _uffd_handler)."""
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
        assert self._view is not None
        if (
            self.zero_pages
            and r.page_size == PAGE
            and self._zeros.startswith(self._view[foff : foff + length])
        ):
            done, err = self._res.zeropage(peer.uffd, dst, length)
            if not err:
                peer.pages_zero += n
        else:
            done, err = self._res.copy(peer.uffd, dst, self._addr + foff, length)
            if not err:
                peer.pages_copied += n
        if err:
            self._fault_failed(peer, r, addr, pg, done, err)
            return
        state[pg : pg + n] = self._ones[:n]
        if peer.touched is not None:
            peer.touched[pg : pg + n] = self._ones[:n]

    def _fault_failed(
        self, peer: _Peer, r: Region, addr: int, pg: int, done: int, err: int
    ) -> None:
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
            self._copy_failed(peer, addr, err)

    def _fault_page(self, peer: _Peer, r: Region, addr: int) -> None:
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
                _, err = self._res.copy(peer.uffd, dst, self._zero_source(ps), ps)
            kind = "pages_zero"
        else:
            _, err = self._res.copy(peer.uffd, dst, self._addr + foff, ps)
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
            self._copy_failed(peer, addr, err)

    def _copy_failed(self, peer: _Peer, addr: int, err: int) -> None:
        if not peer.alive:
            return
        # ENOENT/EFAULT: the range is no longer mapped (munmap raced the fault).
        self.counters["copy_errors"] += 1
        log.warning(
            "%s: resolving the fault at %#x failed: %s", peer.label(), addr, os.strerror(err)
        )

    def _zero_source(self, length: int) -> int:
        """Address of at least `length` readable zero bytes (an untouched anonymous map)."""
        if self._zero_len < length:
            libc = _libc()
            if self._zero_addr:
                libc.munmap(ctypes.c_void_p(self._zero_addr), self._zero_len)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            addr = libc.mmap(None, length, mmap.PROT_READ, flags, -1, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap of a zero source failed")
            self._zero_addr, self._zero_len = int(addr), length
        return self._zero_addr

    def _event(self, peer: _Peer, kind: int, a: int, b: int, c: int) -> None:
        self.counters["events"] += 1
        if kind == UFFD_EVENT_REMOVE:
            peer.removes += 1
            self.counters["removes"] += 1
            self._mark(peer, a, b, REMOVED)
        elif kind == UFFD_EVENT_UNMAP:
            self._mark(peer, a, b, UNMAPPED)
        elif kind == UFFD_EVENT_REMAP:
            peer.regions = _remap(peer.regions, a, b, c)
            for r in peer.regions:
                r.block = max(self.block_size, r.page_size)
            self._handlers[peer.uffd] = self._uffd_handler(peer)
            log.debug("%s: remap %#x -> %#x (+%#x)", peer.label(), a, b, c)
        elif kind == UFFD_EVENT_FORK:
            child = a & 0xFFFFFFFF
            log.info("%s forked; serving the child's userfaultfd %d too", peer.label(), child)
            regions = [Region(r.base, r.size, r.offset, r.page_size) for r in peer.regions]
            # (_attach sets each region's block size)
            self._attach(child, None, 0, regions, state=bytearray(peer.state))
        else:
            log.warning("%s: unexpected userfaultfd event %#x", peer.label(), kind)

    def _mark(self, peer: _Peer, start: int, end: int, value: int) -> None:
        for r in peer.regions:
            lo, hi = max(start, r.base), min(end, r.base + r.size)
            if lo >= hi:
                continue
            pg = (r.offset + lo - r.base) >> PAGE_SHIFT
            last = (r.offset + hi - r.base + PAGE - 1) >> PAGE_SHIFT
            peer.state[pg:last] = bytes([value]) * (last - pg)

    # --- prefetch, retries and draining ----------------------------------------------

    def _chunks(self, peer: _Peer, pages: bytes | bytearray) -> Iterator[tuple[Region, int, int]]:
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

    def _submit(self, peer: _Peer, work: Iterator[tuple[Region, int, int]]) -> None:
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self, self.prefetch_threads)
            self._prefetcher.start()
        with peer.lock:
            peer.prefetch = work
            peer.again.clear()
            peer.queued = True
        self._prefetcher.submit(peer)  # (a no-op if it is in the queue already)

    def _retry_faults(self) -> None:
        """Faults that met EAGAIN (the mapping was changing): try them again."""
        peers, self._retrying = self._retrying, []
        for peer in peers:
            pending, peer.retry = peer.retry, []
            for addr in pending:
                if peer.uffd not in self._peers:
                    break
                self._fault(peer, addr)
            if peer.retry and peer.uffd in self._peers:
                self._retrying.append(peer)

    def _prefetch_piece(
        self, peer: _Peer, r: Region, off: int, length: int, res: uffd.Resolver
    ) -> str:
        """Copy the still-missing pages of one piece (a prefetch thread; peer.busy counts it).
        Returns "ok", "again" (EAGAIN: redo later) or "gone"."""
        assert self._view is not None
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
                    and self._zeros.startswith(self._view[foff : foff + nbytes])
                ):
                    done, err = res.zeropage(
                        peer.uffd, dst, nbytes, uffd.UFFDIO_ZEROPAGE_MODE_DONTWAKE
                    )
                else:
                    done, err = res.copy(
                        peer.uffd, dst, self._addr + foff, nbytes, uffd.UFFDIO_COPY_MODE_DONTWAKE
                    )
                k = done >> PAGE_SHIFT
                state[pg : pg + k] = b"\x01" * k
                with self._stats_lock:  # (prefetch threads count side by side)
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
            everything = b"\x01" * self.npages
            for peer in list(self._peers.values()):
                peer.draining = True
                self._submit(peer, self._chunks(peer, everything))
        elif now > self._drain_deadline:
            log.warning("drain timed out; %d VM(s) may hang at their next fault", len(self._peers))
            return False
        return True

    def _finish_drain(self, peer: _Peer) -> None:
        """Everything is in: unregister the VM's memory so it never needs us again."""
        for r in peer.regions:
            try:
                uffd.unregister(peer.uffd, r.base, r.size)
            except OSError as exc:
                log.warning("%s: unregister %#x failed: %s", peer.label(), r.base, exc)
        self._drop(peer, "drained")


# --- helpers -----------------------------------------------------------------------------


def _remap(regions: list[Region], src: int, dst: int, length: int) -> list[Region]:
    """Regions after mremap moved [src, src+length) to dst (splitting where needed)."""
    out = []
    for r in regions:
        lo, hi = max(src, r.base), min(src + length, r.end)
        if lo >= hi:
            out.append(r)
            continue
        if r.base < lo:
            out.append(Region(r.base, lo - r.base, r.offset, r.page_size))
        out.append(Region(dst + (lo - src), hi - lo, r.offset + (lo - r.base), r.page_size))
        if hi < r.end:
            out.append(Region(hi, r.end - hi, r.offset + (hi - r.base), r.page_size))
    out.sort(key=lambda x: x.base)
    return out


def _peer_pid(conn: socket.socket) -> int:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return 0
    return int(_UCRED.unpack(creds)[0])


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


_libc_cache: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_cache
    if _libc_cache is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc_cache = libc
    return _libc_cache


class _Prefetcher:
    """Copies working sets (and, at stop, everything) into VMs beside the main thread.

    `workers` threads take pieces (up to PREFETCH_CHUNK) of the same VM's work in
    turn and copy them concurrently: UFFDIO_COPY is page allocation + memcpy, ~1 us
    per page on one core, and fcntl.ioctl drops the GIL, so two threads on two cores
    copy twice as fast. Faults come first: the main thread answers them meanwhile
    (the GIL is free during the copies), and the workers run at nice +PREFETCH_NICE so
    the fault path and the VMs' vCPUs win the CPU when it is short."""

    def __init__(self, server: PageServer, workers: int) -> None:
        self.server = server
        self.cv = threading.Condition()
        self.queue: collections.deque[_Peer] = collections.deque()
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._run, name=f"fcvm-prefetch-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def submit(self, peer: _Peer) -> None:
        with self.cv:
            if peer not in self.queue:
                self.queue.append(peer)
            self.cv.notify_all()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        for t in self.threads:
            t.join(10)

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
                outcome = self.server._prefetch_piece(peer, *work, res)
            except Exception:  # never let one VM's trouble stop prefetching for others
                log.exception("%s: prefetch failed", peer.label())
                outcome = "ok"
            self._done(peer, work, outcome)

    def _take(self, peer: _Peer) -> tuple[Region, int, int] | None:
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

    def _done(self, peer: _Peer, work: tuple[Region, int, int], outcome: str) -> None:
        if outcome == "again":
            time.sleep(0.001)  # let the main thread read the pending event first
        with peer.lock:
            peer.busy -= 1
            if outcome == "again" and peer.alive and peer.queued:
                peer.again.append(work)
                self.submit(peer)  # (it may have left the queue meanwhile)
            elif outcome == "gone" and peer.queued:
                peer.prefetch = None
                peer.again.clear()
                peer.queued = False
                self.server._notify("gone", peer)
            if not peer.busy:
                peer.idle.notify_all()
            self._maybe_finished(peer)

    def _maybe_finished(self, peer: _Peer) -> None:
        """(peer.lock held) Report a peer whose work is all handed out and copied."""
        if peer.queued and not peer.busy and peer.prefetch is None and not peer.again:
            peer.queued = False
            if peer.alive:
                self.server._notify("drained" if peer.draining else "prefetched", peer)
