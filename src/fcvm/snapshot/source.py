"""The memory file as UFFDIO_COPY's source: one read-only shared mapping of it.

Every resolution of a fault or a prefetch piece is an ioctl whose source address lies
in this mapping, so the module owns its whole life: map at open, a background thread
populating its page table, unmap at close, plus the two things the copy paths read
from it (a memoryview for zero checks, a bytes of zeros to compare against) and the
readable zeros hugetlbfs needs in place of UFFDIO_ZEROPAGE. It knows nothing about VMs.

Why populate: UFFDIO_COPY reads its source with page faults disabled; a source page
not yet mapped here makes the kernel drop its locks, fault it in and retry, which costs
~0.2-0.4 us per 4 KiB page on these hosts (UFFDIO_COPY of 4 MiB: 1.4 us/page from a
fresh mapping, 1.05-1.2 us/page from a populated one). MADV_POPULATE_READ, 64 MiB at a
time beside serving, also reads the file into the page cache (the VMs need it anyway).

Zero checks are ``zeros.startswith(view[a:b])`` (a memcmp, ~20 GB/s);
``memoryview == memoryview`` compares item by item (~0.5 GB/s: 120 us per 64 KiB).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from pathlib import Path

from fcvm.log import get
from fcvm.snapshot.handshake import PAGE

log = get("snapshot.pageserver.source")  # (a child: the server's log level applies)

POPULATE_CHUNK = 64 << 20
MADV_POPULATE_READ = 22  # Linux 5.14+


class MemorySource:
    """The read-only mapping of one memory file (``open`` maps it, ``close`` unmaps).

    zeros_len: the longest range a caller zero-checks at once (``zeros`` is that long).
    populate: fill in the mapping's page table in a background thread at open.
    """

    def __init__(self, path: Path, *, zeros_len: int, populate: bool = True) -> None:
        self.path = Path(path)
        self.populate = populate
        self.size = 0
        self.npages = 0
        self.addr = 0
        self.view: memoryview | None = None
        self.zeros = b""  # (bytes.startswith(view) is a memcmp; view == view is ~40x slower)
        self._zeros_len = zeros_len
        self._zero_addr = self._zero_len = 0
        self._populator: threading.Thread | None = None
        self._populate_stop = threading.Event()

    def open(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % PAGE:
                raise ValueError(f"{self.path}: size {size} is not a non-zero multiple of 4 KiB")
            addr = libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise OSError(err, f"mmap {self.path}: {os.strerror(err)}")
        finally:
            os.close(fd)
        self.addr = int(addr)
        self.size = size
        self.npages = size // PAGE
        self.view = memoryview((ctypes.c_ubyte * size).from_address(self.addr)).cast("B")
        self.zeros = bytes(self._zeros_len)
        if self.populate:
            self._populate_stop.clear()
            self._populator = threading.Thread(
                target=self._populate, name="fcvm-populate", daemon=True
            )
            self._populator.start()

    def close(self) -> None:
        if self._populator is not None:
            self._populate_stop.set()
            self._populator.join()
            self._populator = None
        if self.addr:
            if self.view is not None:
                self.view.release()
                self.view = None
            libc().munmap(ctypes.c_void_p(self.addr), self.size)
            self.addr = 0
        if self._zero_addr:
            libc().munmap(ctypes.c_void_p(self._zero_addr), self._zero_len)
            self._zero_addr = self._zero_len = 0

    def zero_source(self, length: int) -> int:
        """Address of at least `length` readable zero bytes (an untouched anonymous map)."""
        if self._zero_len < length:
            lib = libc()
            if self._zero_addr:
                lib.munmap(ctypes.c_void_p(self._zero_addr), self._zero_len)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            addr = lib.mmap(None, length, mmap.PROT_READ, flags, -1, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap of a zero source failed")
            self._zero_addr, self._zero_len = int(addr), length
        return self._zero_addr

    def _populate(self) -> None:
        """MADV_POPULATE_READ the mapping, POPULATE_CHUNK at a time, until done or closed."""
        lib = libc()
        addr, size = self.addr, self.size
        t0 = time.monotonic()
        for off in range(0, size, POPULATE_CHUNK):
            if self._populate_stop.is_set():
                return
            n = min(POPULATE_CHUNK, size - off)
            if lib.madvise(ctypes.c_void_p(addr + off), ctypes.c_size_t(n), MADV_POPULATE_READ):
                err = ctypes.get_errno()
                log.debug("MADV_POPULATE_READ of the memory file: %s", os.strerror(err))
                return
        log.debug("memory file mapping populated in %.3f s", time.monotonic() - t0)


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc with mmap/munmap/madvise typed for 64-bit addresses."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc
