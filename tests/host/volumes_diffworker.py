"""Runs operation sequences for the differential tests, in its own process (so it can
run as an unprivileged uid): reads one JSON request per line, prints one JSON reply
per line:

    {"ops": [...], "roots": [...]}  runs the ops in each root in turn: a result list
                                    per root, each result ["ok", value] or
                                    ["err", errno name]
    {"prepare": [...]}              makes prepare()'s starting tree in each (as root)
    {"tree": [...], "remove": B}    tree() of each root; then removes them if B

    volumes_diffworker.py UID [--mntns PATH] [--tmpfs DIR]

--mntns enters the mount namespace PATH names (a container's /proc/PID/ns/mnt, for a
worker started in a guest with `python3 -c SOURCE`); --tmpfs then mounts a tmpfs
(nodev,nosuid, like a map) on DIR unless one is there; both before privileges are
dropped to UID (0: stay root). Only the stdlib, all imported before any of that (the
root may change), and single-threaded (setns of a mount namespace requires it).
`tree()` and `prepare()` are imported by the tests themselves too."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import struct
import sys
from typing import Any

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV = 2, 4
USER = 1000  # prepare()'s unprivileged owner


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
            # answers SEEK_DATA/SEEK_HOLE itself (tmpfs says EINVAL). See DESIGN.md (Volumes).
            return "directory"
        # The offset found is compared, then the position is put back: under the
        # writeback cache the guest kernel answers from its own view (data up to EOF,
        # see DESIGN.md, Volumes), so later reads and writes would land elsewhere than on
        # tmpfs for a reason already known.
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            return [os.lseek(fd, off, whence), os.fstat(fd).st_size]
        finally:
            os.lseek(fd, pos, os.SEEK_SET)

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


def prepare(d: str) -> None:
    """The same starting tree on both sides: root-owned files and dirs, one owned by
    the unprivileged user, a sticky world-writable directory, a read-only file. Modes
    are explicit (the umask plays no part)."""
    os.mkdir(d)
    os.chmod(d, 0o777)
    files = {"d/a": (b"inner", 0o644), "ro": (b"read only", 0o444), "a": (b"hello", 0o664)}
    dirs = {"d": 0o755, "mine": 0o755, "sticky": 0o1777}
    for name, mode in dirs.items():
        os.mkdir(os.path.join(d, name))
        os.chmod(os.path.join(d, name), mode)
    for name, (data, mode) in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(d, name), mode)
    os.chown(os.path.join(d, "mine"), USER, USER)


def enter_mount_namespace(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _c(libc.setns(fd, CLONE_NEWNS))
    finally:
        os.close(fd)
    os.chdir("/")


def mount_tmpfs(d: str) -> None:
    os.makedirs(d, exist_ok=True)
    if os.path.ismount(d):  # (/proc/self is not ours in another pid namespace's /proc)
        return
    _c(libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16g,mode=755"))


def handle(req: dict[str, Any]) -> Any:
    if "prepare" in req:
        for root in req["prepare"]:
            prepare(root)
        return "ok"
    if "tree" in req:
        trees = [tree(root) for root in req["tree"]]
        if req.get("remove"):
            for root in req["tree"]:
                shutil.rmtree(root)
        return trees
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
    return out


def main() -> None:
    uid = int(sys.argv[1])
    opts = dict(zip(sys.argv[2::2], sys.argv[3::2], strict=True))
    if "--mntns" in opts:
        enter_mount_namespace(opts["--mntns"])
    if "--tmpfs" in opts:
        mount_tmpfs(opts["--tmpfs"])
    if uid:
        os.setgroups([uid])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
