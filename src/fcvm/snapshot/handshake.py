"""The handshake: Firecracker's memory regions and userfaultfd, received and validated.

Firecracker (`mem_backend: {backend_type: Uffd}`, see
docs/snapshotting/handling-page-faults-on-snapshot-resume.md) connects to the page
server's socket and sends, in one message, a JSON array of regions
``{base_host_virt_addr, size, offset, page_size}`` with its userfaultfd as SCM_RIGHTS,
then keeps the socket open and never writes to it again.

This module is everything about that one message and the Region it produces, and
nothing about serving: ``receive`` reads and checks it, ``parse_regions`` validates the
JSON against the memory file, ``remap`` is the one later change to a region list (an
mremap). Pure functions on plain data (no server state), so every refusal is a
HandshakeError whose message is the reason the server logs, and the validation is
testable without a userfaultfd.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from fcvm.snapshot import uffd

PAGE = 4096  # the memory file's granule: per-page state maps count in these
# Firecracker backs guest memory with 4 KiB pages or 2 MiB hugetlbfs pages; the
# server's buffers (zero checks, present-page runs) are sized for at most 2 MiB.
SUPPORTED_PAGE_SIZES = (PAGE, 2 << 20)
PAGE_SHIFT = 12
MAX_HANDSHAKE = 64 * 1024
MAX_FDS = 8
_UCRED = struct.Struct("3i")


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


def receive(conn: socket.socket, file_size: int) -> tuple[int, list[Region]] | None:
    """Read the handshake from a non-blocking connection: (userfaultfd, regions sorted by
    address), or None when nothing has arrived yet (a spurious wakeup). Raises
    HandshakeError (having closed any descriptors received) when it is unacceptable."""
    fds: list[int] = []
    try:
        try:
            msg, fds, flags, _ = socket.recv_fds(conn, MAX_HANDSHAKE, MAX_FDS)
        except BlockingIOError:
            return None
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
        regions = parse_regions(msg, file_size)
    except HandshakeError:
        for extra in fds:
            os.close(extra)
        raise
    return fds[0], regions


def peer_pid(conn: socket.socket) -> int:
    """The connecting process's pid (SO_PEERCRED), 0 when unknown."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return 0
    return int(_UCRED.unpack(creds)[0])


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
        if page_size not in SUPPORTED_PAGE_SIZES:
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


def remap(regions: list[Region], src: int, dst: int, length: int) -> list[Region]:
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
