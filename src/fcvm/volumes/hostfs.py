"""The host system calls Python's os module lacks, through ctypes: the *at forms that
work on O_PATH descriptors (AT_EMPTY_PATH), renameat2, utimensat with UTIME_NOW/OMIT,
fallocate with modes, and openat2 with RESOLVE_* (x86_64 syscall numbers).

Every function raises OSError with the errno, like the os module.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD: Final = -100
AT_SYMLINK_NOFOLLOW: Final = 0x100
AT_SYMLINK_FOLLOW: Final = 0x400
AT_EMPTY_PATH: Final = 0x1000
UTIME_NOW: Final = (1 << 30) - 1
UTIME_OMIT: Final = (1 << 30) - 2
RENAME_NOREPLACE: Final = 1 << 0
RENAME_EXCHANGE: Final = 1 << 1
RENAME_WHITEOUT: Final = 1 << 2

RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08

_SYS_RENAMEAT2: Final = 316
_SYS_OPENAT2: Final = 437


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc.syscall.restype = ctypes.c_long
_libc.fchownat.argtypes = [
    ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int,
]  # fmt: skip
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """chown the inode an (O_PATH) fd refers to, never following a symlink.
    uid/gid -1 leave that id unchanged."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH))


def utimens_empty(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat on the inode of an (O_PATH) fd; each time is (sec, nsec), nsec may be
    UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH))


def link_empty(fd: int, newdir: int, name: bytes) -> None:
    """Hard-link the inode of an (O_PATH) fd as newdir/name. AT_EMPTY_PATH needs
    CAP_DAC_READ_SEARCH; without it /proc/self/fd/N with AT_SYMLINK_FOLLOW does the same
    (the magic link resolves to exactly that inode, a symlink included)."""
    if os.geteuid() == 0:
        _check(_libc.linkat(fd, b"", newdir, name, AT_EMPTY_PATH))
    else:
        path = f"/proc/self/fd/{fd}".encode()
        _check(_libc.linkat(AT_FDCWD, path, newdir, name, AT_SYMLINK_FOLLOW))


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_RENAMEAT2), ctypes.c_int(olddir), ctypes.c_char_p(old),
            ctypes.c_int(newdir), ctypes.c_char_p(new), ctypes.c_uint(flags),
        )
    )  # fmt: skip


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate64(fd, mode, offset, length))


def openat2(dirfd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(
        _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path),
            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )  # fmt: skip


def proc_path(fd: int) -> str:
    """The magic link that reaches exactly the inode of `fd` (built from our own fd
    number, never from guest input)."""
    return f"/proc/self/fd/{fd}"
