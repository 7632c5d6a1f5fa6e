"""Firecracker Diff snapshots made whole: a diff memory file merged onto its base.

A Diff snapshot (`PUT /snapshot/create` with ``snapshot_type: Diff``, the VM booted or
loaded with ``track_dirty_pages``) writes a memory file of the guest's full size that
holds only the pages dirtied since the last snapshot (or the load); every other page is
a hole. Firecracker's docs (docs/snapshotting/snapshot-support.md, "Creating diff
snapshots") say to merge such a layer by copying its content over the base memory file
it was taken against; their tools (`snapshot-editor edit-memory rebase`, the deprecated
`rebase-snap`) copy the diff file's data extents, found with SEEK_DATA/SEEK_HOLE.

`merge(base, diff, out)` does that without touching either input: ``out`` becomes a
private copy of base (a reflink where the filesystem can, else a sparse copy:
`fcvm.snapshot.store.copy_disk`) with every data extent of the diff copied over it,
then fsynced. The result is a complete memory file, like a Full snapshot's.

It is only correct if the filesystem reports exactly the pages that were written as
data: a dirty page that the guest zeroed must still be a data extent (a filesystem that
turns written zeros into holes - ZFS with compression - would silently keep base's
bytes), and no extent may include pages that were never written (allocation or
SEEK_DATA granularity above 4 KiB, e.g. tmpfs with huge pages). `holes_unreliable(dir)`
checks exactly that on the directory's own filesystem with a small probe file, and the
backend takes a Full snapshot where it fails; `merge` re-checks what it can on the diff
itself (page alignment, no more data than is allocated) and refuses with MergeError.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from fcvm.errors import FcvmError

PAGE = 4096
_CHUNK = 1 << 20  # bytes per pread/pwrite where copy_file_range cannot be used
_PROBE_SIZE = 4 << 20
# Probe pages: a zero page (must still be data) and a page past a 2 MiB boundary (a
# huge-page granular filesystem would report the whole 2 MiB folio around it).
_PROBE_ZERO_AT = 1 << 20
_PROBE_DATA_AT = (2 << 20) + 2 * PAGE

_probed: dict[int, str | None] = {}  # st_dev -> holes_unreliable() verdict
_copy_file_range = os.copy_file_range  # (a name of our own, so tests can refuse it)


class MergeError(FcvmError):
    """A diff memory file cannot be merged onto its base (the reason says why)."""


@dataclass(frozen=True)
class MergeStats:
    extents: int  # data extents copied from the diff
    data_bytes: int  # bytes copied from the diff
    reflinked: bool  # base was copied by reflink (no data copied)


def data_extents(fd: int, size: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) of every data extent of an open file, in order
    (SEEK_DATA/SEEK_HOLE; a filesystem without them reports the whole file as data)."""
    if size is None:
        size = os.fstat(fd).st_size
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole from offset to the end
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:  # cannot happen on a sane filesystem; never loop on it
            raise MergeError(f"SEEK_HOLE at {start} returned {end}")
        extents.append((start, end - start))
        offset = end
    return extents


def holes_unreliable(directory: Path) -> str | None:
    """Why SEEK_DATA/SEEK_HOLE on `directory`'s filesystem cannot be trusted to find
    exactly the 4 KiB pages written to a sparse file (None: they can). Probes once per
    filesystem with a small temporary file: a written page of zeros must be data, a
    written page past a 2 MiB boundary must be an extent of its own, the rest holes."""
    try:
        dev = os.stat(directory).st_dev
    except OSError as exc:
        return f"cannot probe {directory}: {exc.strerror}"
    if dev in _probed:
        return _probed[dev]
    probe = directory / f".fcvm-holes-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return f"cannot probe {directory}: {exc.strerror}"  # not cached: may be transient
    try:
        os.ftruncate(fd, _PROBE_SIZE)
        os.pwrite(fd, bytes(PAGE), _PROBE_ZERO_AT)
        os.pwrite(fd, b"\x5a" * PAGE, _PROBE_DATA_AT)
        want = [(_PROBE_ZERO_AT, PAGE), (_PROBE_DATA_AT, PAGE)]
        got = data_extents(fd, _PROBE_SIZE)
        verdict = None
        if got != want:
            verdict = (
                f"the filesystem of {directory} does not report sparse files' data at page "
                f"granularity (wrote pages at {want}, SEEK_DATA/SEEK_HOLE found {got})"
            )
    except (OSError, MergeError) as exc:
        verdict = f"probing sparse files in {directory} failed: {exc}"
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    _probed[dev] = verdict
    return verdict


def _check(diff_fd: int, size: int, extents: list[tuple[int, int]]) -> int:
    """Refuse a diff whose extents are not what a Diff snapshot on a trustworthy
    filesystem looks like; returns the data bytes."""
    for start, length in extents:
        end = start + length
        if start % PAGE or (end % PAGE and end != size):
            raise MergeError(f"a data extent of the diff is not page-aligned: {start}..{end}")
    data = sum(length for _, length in extents)
    allocated = os.fstat(diff_fd).st_blocks * 512
    if data > allocated:
        raise MergeError(
            f"the diff claims {data} bytes of data but has {allocated} allocated: its "
            "filesystem reports holes as data"
        )
    return data


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy src[offset:offset+length] to the same offset of dst."""
    pos, end = offset, offset + length
    try:
        while pos < end:
            n = _copy_file_range(src, dst, end - pos, pos, pos)
            if n == 0:
                raise MergeError(f"the diff ended early, at {pos} of {end}")
            pos += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while pos < end:  # copy_file_range refused (cross-filesystem, old kernel)
        chunk = os.pread(src, min(_CHUNK, end - pos), pos)
        if not chunk:
            raise MergeError(f"the diff ended early, at {pos} of {end}")
        written = 0
        while written < len(chunk):
            written += os.pwrite(dst, memoryview(chunk)[written:], pos + written)
        pos += len(chunk)


def merge(base: Path, diff: Path, out: Path) -> MergeStats:
    """out = base's bytes with every data extent of diff copied over them, written and
    fsynced. base and diff are only read; out is replaced. MergeError (out removed) if
    the two cannot be merged safely."""
    from fcvm.snapshot.store import copy_disk

    with open(diff, "rb") as d:
        size = os.fstat(d.fileno()).st_size
        base_size = base.stat().st_size
        if size != base_size:
            raise MergeError(
                f"the diff memory file is {size} bytes and its base {base_size}: "
                "not a layer of that base"
            )
        if size % PAGE:
            raise MergeError(f"the memory files are {size} bytes, not whole pages")
        extents = data_extents(d.fileno(), size)
        data = _check(d.fileno(), size, extents)
        try:
            reflinked = copy_disk(base, out)
            with open(out, "r+b") as o:
                for start, length in extents:
                    _copy_range(d.fileno(), o.fileno(), start, length)
                os.fsync(o.fileno())
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return MergeStats(extents=len(extents), data_bytes=data, reflinked=reflinked)
