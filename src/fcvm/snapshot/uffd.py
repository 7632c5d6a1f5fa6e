"""userfaultfd(2) from Python: creation, the ioctls a page server needs, the msg layout.

Only the stdlib (ctypes for the syscall, fcntl.ioctl with mutable buffers for the
rest). Layouts follow <linux/userfaultfd.h>; all structs are native-endian u64s.

A userfaultfd can be created two ways: the userfaultfd syscall (needs root,
CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 for faults taken in kernel mode), or
ioctl USERFAULTFD_IOC_NEW on /dev/userfaultfd (Linux 6.1+, governed by the file's
permissions). A VMM needs kernel-mode faults (KVM touches guest memory), so
UFFD_USER_MODE_ONLY, which any user may use, is not enough for a VM.

The page server itself never creates one: it receives the VMM's over SCM_RIGHTS, and
the ioctls on a received descriptor need no privilege.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import pwd
import stat
import struct

from fcvm.errors import FcvmError

# --- ioctl numbers -------------------------------------------------------------------


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_RW = _IOC_READ | _IOC_WRITE
UFFDIO = 0xAA
UFFD_API = 0xAA

UFFDIO_API = _ioc(_RW, UFFDIO, 0x3F, 24)  # struct uffdio_api {api, features, ioctls}
UFFDIO_REGISTER = _ioc(_RW, UFFDIO, 0x00, 32)  # {range{start,len}, mode, ioctls}
UFFDIO_UNREGISTER = _ioc(_IOC_READ, UFFDIO, 0x01, 16)  # {start, len}
UFFDIO_WAKE = _ioc(_IOC_READ, UFFDIO, 0x02, 16)  # {start, len}
UFFDIO_COPY = _ioc(_RW, UFFDIO, 0x03, 40)  # {dst, src, len, mode, copy}
UFFDIO_ZEROPAGE = _ioc(_RW, UFFDIO, 0x04, 32)  # {range{start,len}, mode, zeropage}
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, UFFDIO, 0x00, 0)  # on /dev/userfaultfd

# uffdio_api.features
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8

# userfaultfd() flags besides O_CLOEXEC / O_NONBLOCK
UFFD_USER_MODE_ONLY = 1

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

# uffd_msg.event
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1

# struct uffd_msg: u8 event, 7 reserved bytes, then a 24-byte union read as 3 u64s:
# PAGEFAULT (flags, address, thread id), REMOVE/UNMAP (start, end, -),
# REMAP (from, to, length), FORK (the child's uffd in the low 32 bits of the first).
MSG_SIZE = 32
MSG = struct.Struct("=B7xQQQ")
assert MSG.size == MSG_SIZE

_API = struct.Struct("=QQQ")
_REGISTER = struct.Struct("=QQQQ")
_RANGE = struct.Struct("=QQ")
COPY = struct.Struct("=QQQQq")  # dst, src, len, mode, copy (out: bytes copied or -errno)
ZEROPAGE = struct.Struct("=QQQq")  # start, len, mode, zeropage (out)

DEV_USERFAULTFD = "/dev/userfaultfd"
SYSCTL_UNPRIVILEGED = "/proc/sys/vm/unprivileged_userfaultfd"
_SYSCALL_NR = {"x86_64": 323, "aarch64": 282}


class UffdError(FcvmError):
    """A userfaultfd operation failed."""


class UffdUnavailable(UffdError):
    """This process cannot create a userfaultfd (privileges or kernel)."""


# --- creation ------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _create_syscall(flags: int) -> int:
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"userfaultfd syscall number unknown on {platform.machine()}")
    libc = _libc_handle()
    fd = int(libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _create_dev(flags: int) -> int:
    dev = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    try:
        return int(fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags))
    finally:
        os.close(dev)


def create(
    *,
    method: str = "auto",
    nonblocking: bool = True,
    user_mode_only: bool = False,
) -> int:
    """A new userfaultfd (not yet API-handshaked). method: auto | syscall | dev.

    auto tries the syscall, then /dev/userfaultfd. Failure for lack of privilege raises
    UffdUnavailable whose message says what to change.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    if user_mode_only:
        flags |= UFFD_USER_MODE_ONLY
    methods = ("syscall", "dev") if method == "auto" else (method,)
    failures: dict[str, OSError] = {}
    for m in methods:
        try:
            return _create_syscall(flags) if m == "syscall" else _create_dev(flags)
        except OSError as exc:
            failures[m] = exc
    raise unavailable_error(failures, user_mode_only=user_mode_only)


def unavailable_error(
    failures: dict[str, OSError], *, user_mode_only: bool = False
) -> UffdUnavailable:
    """Turn creation failures into one line saying what to change."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    parts = []
    sysctl = _read_sysctl()
    if "syscall" in failures:
        exc = failures["syscall"]
        if exc.errno == errno.EPERM:
            parts.append(
                f"the userfaultfd syscall was refused (vm.unprivileged_userfaultfd={sysctl}, "
                "no CAP_SYS_PTRACE)"
            )
        elif exc.errno == errno.ENOSYS:
            parts.append("the kernel has no userfaultfd syscall (CONFIG_USERFAULTFD)")
        else:
            parts.append(f"the userfaultfd syscall failed: {exc.strerror}")
    if "dev" in failures:
        exc = failures["dev"]
        if exc.errno == errno.ENOENT:
            parts.append(f"{DEV_USERFAULTFD} does not exist (Linux < 6.1)")
        elif exc.errno in (errno.EACCES, errno.EPERM):
            parts.append(f"{DEV_USERFAULTFD} is not accessible ({_describe_dev()})")
        else:
            parts.append(f"{DEV_USERFAULTFD} failed: {exc.strerror}")
    hint = (
        "run as root, or `sysctl -w vm.unprivileged_userfaultfd=1`, or give this user "
        f"access to {DEV_USERFAULTFD} (e.g. `setfacl -m u:{user}:rw {DEV_USERFAULTFD}`); "
        "UFFD_USER_MODE_ONLY works unprivileged but cannot serve the faults KVM takes "
        "on guest memory, so it is not enough for a VM"
    )
    if user_mode_only:
        hint = "UFFD_USER_MODE_ONLY should work for any user; is CONFIG_USERFAULTFD set?"
    return UffdUnavailable(f"cannot create a userfaultfd as {user}: " + "; ".join(parts), hint=hint)


def _read_sysctl() -> str:
    try:
        with open(SYSCTL_UNPRIVILEGED) as f:
            return f.read().strip()
    except OSError:
        return "?"


def _describe_dev() -> str:
    try:
        st = os.stat(DEV_USERFAULTFD)
    except OSError as exc:
        return exc.strerror or "unreadable"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"{stat.filemode(st.st_mode)} owner {owner}"


def probe(*, method: str = "auto") -> None:
    """Raise UffdUnavailable (with guidance) unless this user can create a userfaultfd
    that handles kernel-mode faults, as a VMM running as this user must."""
    fd = create(method=method)
    os.close(fd)


# --- handshake and registration --------------------------------------------------------


def api(fd: int, features: int = 0) -> tuple[int, int]:
    """UFFDIO_API: enable `features`; returns (features supported, ioctls bitmask)."""
    buf = bytearray(_API.pack(UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, buf, True)
    except OSError as exc:
        raise UffdError(f"UFFDIO_API (features {features:#x}) failed: {exc.strerror}") from None
    _, got, ioctls = _API.unpack(buf)
    return got, ioctls


def register(fd: int, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> int:
    """UFFDIO_REGISTER a range; returns the ioctls available on it."""
    buf = bytearray(_REGISTER.pack(start, length, mode, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_REGISTER, buf, True)
    except OSError as exc:
        raise UffdError(f"UFFDIO_REGISTER {start:#x}+{length:#x} failed: {exc.strerror}") from None
    return int(_REGISTER.unpack(buf)[3])


def unregister(fd: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, UFFDIO_UNREGISTER, _RANGE.pack(start, length))


def wake(fd: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, UFFDIO_WAKE, _RANGE.pack(start, length))


def is_userfaultfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


# --- resolving faults ------------------------------------------------------------------


class Resolver:
    """UFFDIO_COPY / UFFDIO_ZEROPAGE with preallocated argument buffers (one per thread).

    Both return the number of bytes resolved and an errno (0 on success). EEXIST means
    a page in the range was already present (copying stopped there); EAGAIN means the
    mapping is changing (an event is pending: read it, then retry).
    """

    __slots__ = ("_copy", "_zero")

    def __init__(self) -> None:
        self._copy = bytearray(COPY.size)
        self._zero = bytearray(ZEROPAGE.size)

    def copy(self, fd: int, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, int]:
        buf = self._copy
        COPY.pack_into(buf, 0, dst, src, length, mode, 0)
        try:
            fcntl.ioctl(fd, UFFDIO_COPY, buf, True)
        except OSError as exc:
            done = COPY.unpack_from(buf)[4]
            return (done if done > 0 else 0), exc.errno or errno.EIO
        return length, 0

    def zeropage(self, fd: int, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        buf = self._zero
        ZEROPAGE.pack_into(buf, 0, start, length, mode, 0)
        try:
            fcntl.ioctl(fd, UFFDIO_ZEROPAGE, buf, True)
        except OSError as exc:
            done = ZEROPAGE.unpack_from(buf)[3]
            return (done if done > 0 else 0), exc.errno or errno.EIO
        return length, 0
