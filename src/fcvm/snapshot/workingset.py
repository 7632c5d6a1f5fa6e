"""The first-touch working set of a snapshot: which pages of its memory file VMs needed.

Stored next to the memory file as one JSON header line followed by a zlib-compressed
byte map (one byte per 4 KiB page of the memory file: 1 = touched). The header names
the memory file's size and mtime so a re-created snapshot never reuses a stale set.
Written atomically (temp file + rename); merged (union) as more VMs report.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from fcvm.fsutil import atomic_write
from fcvm.log import get

PAGE_SIZE = 4096
VERSION = 1
log = get("snapshot.workingset")


def pages_for(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE


def _identity(memory: Path) -> dict[str, int]:
    st = memory.stat()
    return {"memory_size": st.st_size, "memory_mtime_ns": st.st_mtime_ns}


def load(path: Path, memory: Path) -> bytearray | None:
    """The recorded set for this memory file, or None (absent, stale or unreadable)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read working set %s: %s", path, exc)
        return None
    try:
        head, _, body = raw.partition(b"\n")
        header = json.loads(head)
        if header.get("version") != VERSION or header.get("page_size") != PAGE_SIZE:
            return None
        ident = _identity(memory)
        if any(header.get(k) != v for k, v in ident.items()):
            log.info("working set %s is for another memory file; ignoring it", path)
            return None
        data = bytearray(zlib.decompress(body))
    except (ValueError, zlib.error, OSError, AttributeError) as exc:
        log.warning("ignoring malformed working set %s: %s", path, exc)
        return None
    if len(data) != pages_for(ident["memory_size"]):
        return None
    return data


def save(path: Path, memory: Path, pages: bytes | bytearray) -> None:
    header = {"version": VERSION, "page_size": PAGE_SIZE, "pages": len(pages)}
    header.update(_identity(memory))
    header["touched"] = len(pages) - bytes(pages).count(0)
    atomic_write(path, json.dumps(header).encode() + b"\n" + zlib.compress(bytes(pages), 1))


def union(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    """Bytewise OR of two 0/1 maps of equal length."""
    n = len(a)
    return bytearray(
        (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")
    )


def count(pages: bytes | bytearray) -> int:
    return len(pages) - bytes(pages).count(0)


def merge(
    path: Path, memory: Path, known: bytearray | None, touched: bytearray
) -> bytearray | None:
    """Union one VM's `touched` map into the set saved at `path` (`known`: that set if
    already loaded, else it is read). Returns the set saved, or None when `touched` adds
    nothing or saving failed (logged)."""
    if count(touched) == 0:
        return None
    old = known if known is not None else load(path, memory)
    merged = touched if old is None else union(old, touched)
    if old is not None and merged == old:
        return None
    try:
        save(path, memory, merged)
    except OSError as exc:
        log.warning("cannot save working set %s: %s", path, exc)
        return None
    return merged
