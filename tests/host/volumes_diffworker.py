"""Runs operation sequences for the differential test, in its own process (so it can
run as an unprivileged uid): reads one JSON line {"ops": [...], "roots": [...]} at a
time, runs the ops in each root in turn, prints one JSON line with a result list per
root. Each result is ["ok", value] or ["err", errno name]. Only the stdlib, imported
before privileges are dropped. `tree()` is imported by the test itself."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import stat
import struct
import sys
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _c(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def norm_stat(st: os.stat_result) -> list[int]:
    # Everything comparable between two filesystems: not inode numbers, devices, times
    # (these differ by when they ran) or blocks (allocation may lag under writeback).
    return [st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_rdev]


class Runner:
    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: list[int | None] = []

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def fd(self, i: int) -> int:
        if not self.fds:
            raise OSError(errno.EBADF, "no fd")
        fd = self.fds[i % len(self.fds)]
        if fd is None:
            raise OSError(errno.EBADF, "closed")
        return fd

    def run(self, op: list[Any]) -> Any:
        name, *a = op
        return getattr(self, "op_" + name)(*a)

    def op_open(self, path: str, flags: int, mode: int) -> str:
        # O_NONBLOCK: a fifo made by an earlier mknod must not block the worker (it has
        # no effect on regular files).
        self.fds.append(os.open(self.p(path), flags | os.O_CLOEXEC | os.O_NONBLOCK, mode))
        return "fd"

    def op_close(self, i: int) -> None:
        fd = self.fd(i)
        os.close(fd)
        self.fds[self.fds.index(fd)] = None

    def op_pwrite(self, i: int, off: int, n: int, byte: int) -> int:
        return os.pwrite(self.fd(i), bytes([byte]) * n, off)

    def op_write(self, i: int, n: int, byte: int) -> int:
        return os.write(self.fd(i), bytes([byte]) * n)

    def op_pread(self, i: int, off: int, n: int) -> str:
        return os.pread(self.fd(i), n, off).hex()

    def op_ftruncate(self, i: int, size: int) -> None:
        os.ftruncate(self.fd(i), size)

    def op_truncate(self, path: str, size: int) -> None:
        os.truncate(self.p(path), size)

    def op_fstat(self, i: int) -> list[int]:
        return norm_stat(os.fstat(self.fd(i)))

    def op_stat(self, path: str, follow: bool) -> list[int]:
        return norm_stat(os.stat(self.p(path), follow_symlinks=follow))

    def op_chmod(self, path: str, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def op_chown(self, path: str, uid: int, gid: int, follow: bool) -> None:
        os.chown(self.p(path), uid, gid, follow_symlinks=follow)

    def op_utime(self, path: str, ns: list[int] | None, follow: bool) -> list[Any]:
        if ns is None:
            os.utime(self.p(path), follow_symlinks=follow)
        else:
            os.utime(self.p(path), ns=(ns[0], ns[1]), follow_symlinks=follow)
        st = os.stat(self.p(path), follow_symlinks=follow)
        if ns is None:
            return ["now"]
        return [st.st_atime_ns, st.st_mtime_ns]

    def op_mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self.p(path), mode)

    def op_rmdir(self, path: str) -> None:
        os.rmdir(self.p(path))

    def op_unlink(self, path: str) -> None:
        os.unlink(self.p(path))

    def op_symlink(self, target: str, path: str) -> None:
        os.symlink(target, self.p(path))

    def op_readlink(self, path: str) -> str:
        return os.readlink(self.p(path))

    def op_link(self, a: str, b: str) -> None:
        os.link(self.p(a), self.p(b), follow_symlinks=False)

    def op_rename(self, a: str, b: str, flags: int) -> None:
        _c(libc.renameat2(-100, self.p(a).encode(), -100, self.p(b).encode(), flags))

    def op_mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        os.mknod(self.p(path), mode, os.makedev(major, minor))

    def op_setxattr(self, path: str, key: str, value: str, flags: int) -> None:
        os.setxattr(self.p(path), key, value.encode(), flags, follow_symlinks=False)

    def op_getxattr(self, path: str, key: str) -> str:
        return os.getxattr(self.p(path), key, follow_symlinks=False).decode()

    def op_listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(self.p(path), follow_symlinks=False))

    def op_removexattr(self, path: str, key: str) -> None:
        os.removexattr(self.p(path), key, follow_symlinks=False)

    def op_fallocate(self, i: int, mode: int, off: int, length: int) -> None:
        _c(libc.fallocate(self.fd(i), mode, off, length))

    def op_lseek(self, i: int, off: int, whence: int) -> list[int] | str:
        fd = self.fd(i)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # Known difference: FUSE directories use the kernel's generic llseek, which
            # answers SEEK_DATA/SEEK_HOLE itself (tmpfs says EINVAL). See DESIGN-volumes.
            return "directory"
        return [os.lseek(fd, off, whence), os.fstat(fd).st_size]

    def op_fsync(self, i: int) -> None:
        os.fsync(self.fd(i))

    def op_listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.p(path)))

    def op_access(self, path: str, mode: int) -> bool:
        return os.access(self.p(path), mode)

    def op_ofdlock(self, i: int, cmd: int, ltype: int, start: int, length: int) -> list[int]:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (OFD: pid 0 in, -1 out)
        arg = struct.pack("hhqqi4x", ltype, 0, start, length, 0)
        res = fcntl.fcntl(self.fd(i), cmd, arg)
        t, _, s, n, pid = struct.unpack("hhqqi4x", res)
        return [t, s, n, pid] if cmd == 36 else []  # F_OFD_GETLK reports

    def op_flock(self, i: int, how: int) -> None:
        fcntl.flock(self.fd(i), how | fcntl.LOCK_NB)

    def finish(self) -> None:
        for fd in self.fds:
            if fd is not None:
                os.close(fd)


def tree(root: str) -> list[list[Any]]:
    """Every entry under root with its comparable stat and small files' data."""
    out = []

    def raise_(e: OSError) -> None:
        raise e

    for dirpath, dirs, files in os.walk(root, onerror=raise_):
        for n in sorted(dirs + files):
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            data = ""
            if stat.S_ISREG(st.st_mode) and st.st_size < 1 << 20:
                with open(full, "rb") as f:
                    data = f.read().hex()
            xattrs = sorted(os.listxattr(full, follow_symlinks=False))
            out.append([os.path.relpath(full, root), *norm_stat(st), data, xattrs])
    return sorted(out)


def main() -> None:
    uid = int(sys.argv[1])
    if uid:
        os.setgroups([uid])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    for line in sys.stdin:
        req = json.loads(line)
        out = []
        for root in req["roots"]:
            r = Runner(root)
            results: list[Any] = []
            for op in req["ops"]:
                try:
                    results.append(["ok", r.run(op)])
                except OSError as e:
                    results.append(["err", errno.errorcode.get(e.errno or 0, str(e.errno))])
                except Exception as e:  # an argument Python itself refuses
                    results.append(["exc", type(e).__name__])
            r.finish()
            out.append(results)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
