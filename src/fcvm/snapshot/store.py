"""Snapshot directories on disk: writing one whole, using one, removing one.

    with store.writer(name) as w:          # BASE/snapshots/.tmp-NAME-PID, locked
        ...write w.layout.memory, .vmstate, disks...
        w.commit(meta)                     # meta.json last, then renamed to NAME
    lease = store.lease(name)              # flock LOCK_SH on NAME/lock while a VM uses it
    store.remove(name)                     # LOCK_EX|LOCK_NB first: in use -> refused

A killed writer leaves a `.tmp-*` directory that nothing restores (only complete,
renamed directories are looked up); `collect_garbage()` (run by `fcvm gc`) removes
those whose writer is gone (their lock is free). Locks are flock(2): they vanish with
the process holding them, so a VM killed -9 never keeps its snapshot "in use".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fcvm import log, paths
from fcvm.fsutil import atomic_write
from fcvm.snapshot.layout import (
    LOCK_FILE,
    TMP_PREFIX,
    SnapshotError,
    SnapshotLayout,
    SnapshotMeta,
    layout,
)

logger = log.get("snapshot.store")

FICLONE = 0x40049409


class SnapshotInUse(SnapshotError):
    """A VM is using the snapshot (or it is being written)."""


@dataclass
class Lease:
    """A shared lock on a snapshot for as long as a VM uses it."""

    name: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock(path: Path, how: int) -> int | None:
    """An fd holding flock `how` on path (created), or None if it would block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lease(name: str) -> Lease | None:
    """Hold snapshot `name` in use (None if it is gone or being removed)."""
    snap = layout(name)
    try:
        fd = _lock(snap.lock, fcntl.LOCK_SH)
    except FileNotFoundError:
        return None
    if fd is None or not snap.meta.is_file():
        if fd is not None:
            os.close(fd)
        return None
    with contextlib.suppress(OSError):
        snap.last_used.touch()
    return Lease(name, fd)


def in_use(snap: SnapshotLayout) -> bool:
    try:
        fd = _lock(snap.lock, fcntl.LOCK_EX)
    except FileNotFoundError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def remove(name: str) -> None:
    """Delete a snapshot; SnapshotInUse while a VM uses it."""
    snap = layout(name)
    if not snap.dir.is_dir():
        raise SnapshotError(f"no snapshot named {name!r}")
    fd = _lock(snap.lock, fcntl.LOCK_EX)
    if fd is None:
        raise SnapshotInUse(f"snapshot {name!r} is in use by a running VM")
    try:
        # Rename first: from here nobody can look it up, even while it is deleted.
        doomed = snap.dir.with_name(f"{TMP_PREFIX}rm-{name}-{os.getpid()}")
        os.rename(snap.dir, doomed)
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)


class Writer:
    """A snapshot being written: files go into `layout.dir`, `commit` publishes it."""

    def __init__(self, name: str) -> None:
        self.name = name
        final = layout(name)
        tmp = final.dir.with_name(f"{TMP_PREFIX}{name}-{os.getpid()}")
        self.layout = SnapshotLayout(name=name, dir=tmp)
        self.final = final
        self._fd: int | None = None
        self.committed = False

    def open(self) -> None:
        shutil.rmtree(self.layout.dir, ignore_errors=True)
        self.layout.dir.mkdir(parents=True)
        self._fd = _lock(self.layout.dir / LOCK_FILE, fcntl.LOCK_EX)

    def commit(self, meta: SnapshotMeta) -> None:
        """Record the state file's identity in meta, write it last, rename into place
        (replacing an older snapshot of the same name unless that one is in use)."""
        snap = self.layout
        meta.state_size = snap.vmstate.stat().st_size
        meta.state_sha256 = file_sha256(snap.vmstate)
        meta.memory_size = snap.memory.stat().st_size
        meta.memory_mtime_ns = snap.memory.stat().st_mtime_ns
        atomic_write(snap.meta, json.dumps(meta.to_json(), indent=1))
        if self.final.dir.exists():
            remove(self.name)
        os.rename(snap.dir, self.final.dir)
        self.committed = True

    def abandon(self) -> None:
        if not self.committed:
            shutil.rmtree(self.layout.dir, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def writer(name: str) -> Iterator[Writer]:
    w = Writer(name)
    w.open()
    try:
        yield w
    finally:
        w.abandon()


def collect_garbage() -> list[str]:
    """Remove what killed writers left (their lock is free); the names removed."""
    root = paths.snapshots_dir()
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        try:
            fd = _lock(entry / LOCK_FILE, fcntl.LOCK_EX)
        except OSError:
            fd = None
        if fd is None:
            continue  # being written right now
        shutil.rmtree(entry, ignore_errors=True)
        os.close(fd)
        removed.append(entry.name)
    return removed


def why_unusable(snap: SnapshotLayout, meta: SnapshotMeta) -> str | None:
    """Why this snapshot must not be restored (None: its files are as written)."""
    try:
        state = snap.vmstate.stat()
        memory = snap.memory.stat()
    except OSError as exc:
        return f"{Path(exc.filename or '?').name} is missing"
    if state.st_size != meta.state_size:
        return f"the state file is {state.st_size} bytes, not {meta.state_size}"
    if memory.st_size != meta.memory_size:
        return f"the memory file is {memory.st_size} bytes, not {meta.memory_size}"
    if memory.st_mtime_ns != meta.memory_mtime_ns:
        return "the memory file was changed after the snapshot was written"
    if file_sha256(snap.vmstate) != meta.state_sha256:
        return "the state file is corrupt (checksum mismatch)"
    for drive, name in meta.disks.items():
        if not (snap.dir / name).is_file():
            return f"the disk of drive {drive} is missing"
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def size_on_disk(directory: Path) -> int:
    """Bytes allocated (sparse files count what they hold, not their length)."""
    total = 0
    for f in directory.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.lstat().st_blocks * 512
    return total


def copy_disk(src: Path, dst: Path) -> bool:
    """dst = a private copy of src: a reflink where the filesystem can (FICLONE: btrfs,
    XFS - instant, shares blocks until written), else a sparse copy (only the data
    extents are copied). True if it was a reflink."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fout.fileno(), data, hole)
            offset = hole
    return False


# copy_file_range refuses some pairs of files (two filesystems: EXDEV; some kinds of
# file or filesystem: EOPNOTSUPP, EINVAL); the bytes are then read and written.
_NO_COPY_RANGE = (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_CHUNK = 1 << 20


def _copy_range(fin: int, fout: int, pos: int, end: int) -> None:
    """Bytes [pos, end) of fin to the same offsets of fout."""
    while pos < end:
        try:
            n = os.copy_file_range(fin, fout, end - pos, pos, pos)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            break
        if n == 0:
            return
        pos += n
    while pos < end:
        chunk = os.pread(fin, min(_CHUNK, end - pos), pos)
        if not chunk:
            return
        written = 0
        while written < len(chunk):
            written += os.pwrite(fout, chunk[written:], pos + written)
        pos += len(chunk)
