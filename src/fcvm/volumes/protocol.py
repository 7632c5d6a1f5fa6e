"""The FUSE wire protocol (include/uapi/linux/fuse.h, 7.31 and later): decoding the
kernel's requests and encoding replies. No I/O here, so every byte can be tested.

A request is `fuse_in_header` (40 bytes; its first u32 is the whole message's length)
and an opcode-specific body; a reply is `fuse_out_header` (16 bytes, first u32 again the
length) and a body. Everything is little-endian native x86_64 layout. The guest is
hostile: every length, name and count is checked here before anything uses it, and a
message that does not parse raises `Malformed`, which ends the mapping.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

KERNEL_MAJOR: Final = 7
# The newest minor whose layouts this module speaks. The kernel and we both use the
# smaller of the two minors; 7.31 is the oldest we accept (Linux 5.7).
OUR_MINOR: Final = 36
MIN_MINOR: Final = 31

PAGE: Final = 4096
MAX_PAGES: Final = 256  # FUSE_MAX_MAX_PAGES: 1 MiB per READ/WRITE
MAX_WRITE: Final = MAX_PAGES * PAGE
MAX_READ: Final = MAX_PAGES * PAGE
# The largest request we accept: a full WRITE (header + fuse_write_in + data) or a
# SETXATTR of XATTR_SIZE_MAX; a page of slack for the structs. Anything larger is a
# protocol violation, not a big request.
MAX_REQUEST: Final = MAX_WRITE + PAGE
NAME_MAX: Final = 255
PATH_MAX: Final = 4096
XATTR_SIZE_MAX: Final = 65536
XATTR_LIST_MAX: Final = 65536
XATTR_NAME_MAX: Final = 255
ROOT_ID: Final = 1


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# INIT flags (fuse_init_in/out.flags; bits 32+ travel in flags2).
ASYNC_READ: Final = 1 << 0
POSIX_LOCKS: Final = 1 << 1
ATOMIC_O_TRUNC: Final = 1 << 3
EXPORT_SUPPORT: Final = 1 << 4
BIG_WRITES: Final = 1 << 5
DONT_MASK: Final = 1 << 6
FLOCK_LOCKS: Final = 1 << 10
AUTO_INVAL_DATA: Final = 1 << 12
DO_READDIRPLUS: Final = 1 << 13
READDIRPLUS_AUTO: Final = 1 << 14
ASYNC_DIO: Final = 1 << 15
WRITEBACK_CACHE: Final = 1 << 16
PARALLEL_DIROPS: Final = 1 << 18
HANDLE_KILLPRIV: Final = 1 << 19
MAX_PAGES_FLAG: Final = 1 << 22
HANDLE_KILLPRIV_V2: Final = 1 << 28
SETXATTR_EXT: Final = 1 << 29
INIT_EXT: Final = 1 << 30

# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_CTIME: Final = 1 << 10
FATTR_KILL_SUIDGID: Final = 1 << 11

FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_CACHE_DIR: Final = 1 << 3

RELEASE_FLUSH: Final = 1 << 0
RELEASE_FLOCK_UNLOCK: Final = 1 << 1
GETATTR_FH: Final = 1 << 0
LK_FLOCK: Final = 1 << 0
WRITE_CACHE: Final = 1 << 0
WRITE_KILL_SUIDGID: Final = 1 << 2
OPEN_KILL_SUIDGID: Final = 1 << 0
FSYNC_FDATASYNC: Final = 1 << 0

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
IN_HEADER_SIZE: Final = IN_HEADER.size  # 40
OUT_HEADER_SIZE: Final = OUT_HEADER.size  # 16

# Request bodies.
INIT_IN_COMPAT = struct.Struct("<IIII")  # major minor max_readahead flags
U32 = struct.Struct("<I")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")  # without FUSE_SETXATTR_EXT, which we never offer
GETXATTR_IN = struct.Struct("<II")
LK_IN = struct.Struct("<QQQQIIII")  # fh owner start end type pid lk_flags pad
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")

# Reply bodies.
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QIi")
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
GETXATTR_OUT = struct.Struct("<II")
LK_OUT = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes
DIRENT_HEAD = struct.Struct("<QQII")
ENTRY_SIZE: Final = ENTRY_HEAD.size + ATTR.size  # 128


class Malformed(Exception):
    """The message cannot be a kernel request: the mapping ends."""


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    extlen: int  # total_extlen: extension bytes (in 8-byte units) at the body's end


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """The fixed header of a request; `buf` holds at least IN_HEADER_SIZE bytes."""
    if len(buf) < IN_HEADER_SIZE:
        raise Malformed(f"header of {len(buf)} bytes, need {IN_HEADER_SIZE}")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(buf)
    if length < IN_HEADER_SIZE:
        raise Malformed(f"message length {length} is shorter than its header")
    if length > MAX_REQUEST:
        raise Malformed(f"message length {length} exceeds the limit of {MAX_REQUEST}")
    if extlen * 8 > length - IN_HEADER_SIZE:
        raise Malformed(f"extension length {extlen * 8} exceeds the message")
    return Header(length, opcode, unique, nodeid, uid, gid, pid, extlen)


class Body:
    """A cursor over one request body. Every read is bounds-checked; a short body or an
    unterminated string is `Malformed` (the kernel never sends one)."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self._pos = 0

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        if self._pos + st.size > len(self._buf):
            raise Malformed(f"body of {len(self._buf)} bytes too short for {st.size}-byte struct")
        vals = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return vals

    def cstring(self, limit: int) -> bytes:
        """A NUL-terminated string of at most `limit` bytes before the NUL. Longer
        strings are Malformed too: the kernel caps names and link targets itself."""
        end = min(len(self._buf), self._pos + limit + 1)
        chunk = self._buf[self._pos : end]
        idx = bytes(chunk).find(b"\0")
        if idx < 0:
            raise Malformed("string without a NUL terminator (or too long)")
        out = bytes(chunk[:idx])
        self._pos += idx + 1
        return out

    def take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._buf):
            raise Malformed(f"body too short for {n} data bytes")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def remaining(self) -> int:
        return len(self._buf) - self._pos


# ---------------------------------------------------------------------------- replies


def out_header(length: int, error: int, unique: int) -> bytes:
    return OUT_HEADER.pack(length, error, unique)


def reply(unique: int, body: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER_SIZE + len(body), 0, unique) + body


def error_reply(unique: int, errno_: int) -> bytes:
    # The kernel wants a negative errno in 1..4095; anything else is EIO.
    if not 0 < errno_ < 4096:
        errno_ = 5
    return OUT_HEADER.pack(OUT_HEADER_SIZE, -errno_, unique)


@dataclass(frozen=True, slots=True)
class Attr:
    """What the guest sees of an inode (ids already mapped for the guest)."""

    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int  # already in the kernel's new_encode_dev() form
    blksize: int


def _split_ns(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)  # floor division keeps nsec in 0..999999999
    return sec, nsec


def pack_attr(a: Attr) -> bytes:
    asec, ansec = _split_ns(a.atime_ns)
    msec, mnsec = _split_ns(a.mtime_ns)
    csec, cnsec = _split_ns(a.ctime_ns)
    return ATTR.pack(
        a.ino, a.size, a.blocks, asec, msec, csec, ansec, mnsec, cnsec,
        a.mode, min(a.nlink, 0xFFFFFFFF), a.uid, a.gid, a.rdev, a.blksize, 0,
    )  # fmt: skip


def _valid(seconds: float) -> tuple[int, int]:
    sec = int(seconds)
    return sec, int((seconds - sec) * 1e9)


def pack_entry(nodeid: int, generation: int, attr: Attr | None, timeout: float) -> bytes:
    """fuse_entry_out. nodeid 0 with no attr is a negative entry (or, in READDIRPLUS,
    "no entry for this name")."""
    sec, nsec = _valid(timeout)
    head = ENTRY_HEAD.pack(nodeid, generation, sec, sec, nsec, nsec)
    return head + (pack_attr(attr) if attr is not None else bytes(ATTR.size))


def pack_attr_out(attr: Attr, timeout: float) -> bytes:
    sec, nsec = _valid(timeout)
    return ATTR_OUT_HEAD.pack(sec, nsec, 0) + pack_attr(attr)


def dirent_size(name: bytes, plus: bool) -> int:
    n = DIRENT_HEAD.size + len(name)
    n = (n + 7) & ~7
    return n + ENTRY_SIZE if plus else n


def pack_dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    raw = DIRENT_HEAD.pack(ino, off, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)


def new_encode_dev(major: int, minor: int) -> int:
    """The kernel's 32-bit dev_t encoding, used by fuse_attr.rdev and fuse_mknod_in."""
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def new_decode_dev(dev: int) -> tuple[int, int]:
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return major, minor
