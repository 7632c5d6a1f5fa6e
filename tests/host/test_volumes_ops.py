"""Every operation through a real FUSE mount (relay + server, no VM), by hand: the
cases a differential test would reach only by luck."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.volumes_harness import Mount, env_fixture, mount_fixture

pytestmark = pytest.mark.host
GiB = 1 << 30
libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def vol_env() -> Iterator[tuple[Path, Path]]:
    yield from env_fixture()


@pytest.fixture
def mount(vol_env: tuple[Path, Path]) -> Iterator[Mount]:
    yield from mount_fixture(vol_env)


def errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


def test_create_read_write_excl_append_trunc(mount: Mount) -> None:
    f = mount.mnt / "f"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    assert os.write(fd, b"hello world") == 11
    assert os.pread(fd, 5, 6) == b"world"
    os.close(fd)
    assert errno_of(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 11
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.pwrite(fd, b"?", 0)  # Linux: pwrite on O_APPEND appends too
    os.close(fd)
    assert f.read_bytes() == b"hello world!?"
    assert (mount.backing / "f").read_bytes() == b"hello world!?"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(f).st_size == 0 and (mount.backing / "f").stat().st_size == 0
    assert errno_of(os.open, mount.mnt / "nope", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, mount.mnt, os.O_WRONLY) == errno.EISDIR


@pytest.mark.parametrize("writeback", [True, False])
def test_huge_sparse_file_and_seek_data_hole(vol_env: tuple[Path, Path], writeback: bool) -> None:
    """Files over 4 GiB stay sparse. SEEK_DATA/SEEK_HOLE report the host's holes without
    the writeback cache; with it, the guest kernel answers itself (all data up to EOF),
    since data still in its page cache would otherwise fall into a reported hole."""
    for m in mount_fixture(vol_env, writeback=writeback):
        f = m.mnt / "big"
        fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
        os.pwrite(fd, b"A" * 4096, 0)
        os.pwrite(fd, b"tail", 5 * GiB)
        assert os.stat(f).st_size == 5 * GiB + 4
        assert os.pread(fd, 4, 5 * GiB) == b"tail"
        assert os.pread(fd, 8, 3 * GiB) == bytes(8)
        if writeback:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 5 * GiB + 4
            assert os.lseek(fd, 4096, os.SEEK_DATA) == 4096
        else:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
            assert os.lseek(fd, 4096, os.SEEK_DATA) == 5 * GiB
        assert errno_of(os.lseek, fd, 5 * GiB + 10, os.SEEK_DATA) == errno.ENXIO
        os.ftruncate(fd, 6 * GiB)
        os.close(fd)
        st = os.stat(m.backing / "big")
        assert st.st_size == 6 * GiB and st.st_blocks * 512 < 1 << 20


def test_readdir_10000_entries_stable_offsets(mount: Mount) -> None:
    d = mount.backing / "many"
    d.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(10_000)}
    for n in names:
        (d / n).touch()
    listed = os.listdir(mount.mnt / "many")
    assert len(listed) == len(listed) and set(listed) == names
    # Remove half while reading: offsets are positions in a snapshot, so every
    # surviving entry is seen exactly once (none skipped, none twice).
    seen: list[str] = []
    with os.scandir(mount.mnt / "many") as it:
        for i, ent in enumerate(it):
            seen.append(ent.name)
            if i == 100:
                for n in sorted(names)[5000:]:
                    os.unlink(d / n)
    assert len(seen) == len(set(seen))
    assert set(sorted(names)[:5000]) <= set(seen)
    mk = mount.mnt / "made"
    mk.mkdir()
    for i in range(300):
        (mk / f"m{i}").touch()
    assert sorted(os.listdir(mk)) == sorted(f"m{i}" for i in range(300))


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_exchange_noreplace(mount: Mount) -> None:
    a, b = mount.mnt / "a", mount.mnt / "b"
    a.write_text("A")
    b.mkdir()
    assert errno_of(renameat2, a, b, 1) == errno.EEXIST  # RENAME_NOREPLACE
    renameat2(a, b, 2)  # RENAME_EXCHANGE: file and directory swap places
    assert a.is_dir() and b.read_text() == "A"
    assert (mount.backing / "a").is_dir() and (mount.backing / "b").read_text() == "A"
    renameat2(b, mount.mnt / "c", 1)
    assert (mount.mnt / "c").read_text() == "A" and not b.exists()
    assert errno_of(renameat2, a, mount.mnt / "c", 3) == errno.EINVAL
    assert errno_of(os.rename, mount.mnt / "c", a) == errno.EISDIR
    os.rename(mount.mnt / "c", mount.mnt / "a" / "inside")
    assert (mount.backing / "a" / "inside").read_text() == "A"
    assert errno_of(os.rename, a, a / "sub") == errno.EINVAL


LOCKER = r"""
import fcntl, os, struct, sys, time
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if mode == "try":
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        print("got")
    except OSError as e:
        print("errno", e.errno)
    # F_GETLK: who holds bytes 0..9? (struct flock: type, whence, start, len, pid)
    res = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 10, 0))
    print("holder", struct.unpack("hhqqi", res)[4])
elif mode == "wait":
    t = time.monotonic()
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    print("waited", round(time.monotonic() - t, 1))
elif mode == "waitint":
    import signal
    def stop(*_):
        raise RuntimeError
    signal.signal(signal.SIGUSR1, stop)
    print("waiting", flush=True)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        print("got")
    except RuntimeError:
        print("interrupted")
    time.sleep(0.3)
elif mode == "flock":
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("got")
    except OSError as e:
        print("errno", e.errno)
elif mode == "flockwait":
    t = time.monotonic()
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("waited", round(time.monotonic() - t, 1))
"""


def locker(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", LOCKER, str(path), mode],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def test_posix_locks_between_processes(mount: Mount) -> None:
    f = mount.mnt / "locked"
    f.write_bytes(bytes(100))
    fd = os.open(f, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    out = locker(f, "try").communicate(timeout=30)[0].split("\n")
    assert out[0] == f"errno {errno.EAGAIN}" and out[1] == f"holder {os.getpid()}"
    waiter = locker(f, "wait")
    time.sleep(0.5)
    assert waiter.poll() is None  # blocked in F_SETLKW
    os.close(fd)  # close() drops the lock (FLUSH)
    out = waiter.communicate(timeout=30)[0]
    assert out.startswith("waited") and float(out.split()[1]) >= 0.4
    # Other ranges and shared locks do not conflict.
    fd = os.open(f, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 50)
    assert locker(f, "try").communicate(timeout=30)[0].startswith("got")
    os.close(fd)


def test_interrupted_lock_wait(mount: Mount) -> None:
    """A signal to a process blocked in F_SETLKW: the kernel sends INTERRUPT, the queued
    request fails with EINTR and leaves nothing queued."""
    f = mount.mnt / "locked"
    f.write_bytes(bytes(10))
    fd = os.open(f, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    waiter = locker(f, "waitint")
    assert waiter.stdout is not None and waiter.stdout.readline() == "waiting\n"
    time.sleep(0.3)
    waiter.send_signal(signal.SIGUSR1)
    assert waiter.communicate(timeout=30)[0].strip() == "interrupted"
    ops = mount.server._ops
    assert ops is not None and not ops.locks.waiters
    os.close(fd)


def test_flock(mount: Mount) -> None:
    f = mount.mnt / "flocked"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert locker(f, "flock").communicate(timeout=30)[0].strip() == f"errno {errno.EAGAIN}"
    # Two opens in one process are two flock owners too.
    fd2 = os.open(f, os.O_RDONLY)
    assert errno_of(fcntl.flock, fd2, fcntl.LOCK_SH | fcntl.LOCK_NB) == errno.EAGAIN
    waiter = locker(f, "flockwait")
    time.sleep(0.5)
    assert waiter.poll() is None
    fcntl.flock(fd, fcntl.LOCK_UN)
    assert waiter.communicate(timeout=30)[0].startswith("waited")
    os.close(fd)
    os.close(fd2)


def test_xattrs(mount: Mount) -> None:
    f = mount.mnt / "x"
    f.write_text("")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.big", b"v" * 60000)
    os.setxattr(f, "trusted.t", b"2")
    assert os.getxattr(f, "user.a") == b"1" and len(os.getxattr(f, "user.big")) == 60000
    assert sorted(os.listxattr(f)) == ["trusted.t", "user.a", "user.big"]
    assert os.getxattr(mount.backing / "x", "trusted.t") == b"2"
    assert errno_of(os.setxattr, f, "user.a", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.zz", b"x", os.XATTR_REPLACE) == errno.ENODATA
    assert errno_of(os.getxattr, f, "user.none") == errno.ENODATA
    cap = struct.pack("<5I", 0x02000001, 1 << 21, 0, 0, 0)  # CAP_SYS_ADMIN, effective
    assert errno_of(os.setxattr, f, "security.capability", cap) == errno.EPERM
    assert errno_of(os.setxattr, f, "security.evil", b"x") == errno.EPERM
    acl = struct.pack("<I", 2) + b"".join(  # a valid ACL, or the kernel says EINVAL first
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 6), (4, 4), (0x20, 4))
    )
    assert errno_of(os.setxattr, f, "system.posix_acl_access", acl) == errno.EOPNOTSUPP
    assert errno_of(os.setxattr, f, "bogus.x", b"x") == errno.EOPNOTSUPP
    os.removexattr(f, "user.a")
    assert errno_of(os.removexattr, f, "user.a") == errno.ENODATA
    assert "user.a" not in os.listxattr(mount.backing / "x")
    buf = ctypes.create_string_buffer(2)  # too small: ERANGE
    assert libc.getxattr(bytes(f), b"user.big", buf, 2) == -1 and ctypes.get_errno() == errno.ERANGE


def test_statfs(mount: Mount) -> None:
    a, b = os.statvfs(mount.mnt), os.statvfs(mount.backing)
    assert (a.f_blocks, a.f_bsize, a.f_files, a.f_namemax) == (
        b.f_blocks,
        b.f_bsize,
        b.f_files,
        b.f_namemax,
    )


def test_mknod_fifo_socket_device(mount: Mount) -> None:
    os.mkfifo(mount.mnt / "fifo", 0o600)
    os.mknod(mount.mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(mount.mnt / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(mount.mnt / "sock"))
    b = mount.backing
    assert stat.S_ISFIFO(os.lstat(b / "fifo").st_mode)
    st = os.lstat(b / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.stat(mount.mnt / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.lstat(mount.mnt / "blk").st_mode)
    assert stat.S_ISSOCK(os.lstat(b / "sock").st_mode)
    # nodev mount: device nodes do not open (EACCES); a fifo is the kernel's own.
    assert errno_of(os.open, mount.mnt / "null", os.O_RDONLY) == errno.EACCES
    r = os.open(mount.mnt / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(mount.mnt / "fifo", os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"through the guest's pipe")
    assert os.read(r, 100) == b"through the guest's pipe"
    os.close(r)
    os.close(w)
    types = {e.name: (e.is_dir(), e.is_file(), e.is_symlink()) for e in os.scandir(mount.mnt)}
    assert types["fifo"] == (False, False, False)


def test_symlink_readlink_link(mount: Mount) -> None:
    m = mount.mnt
    (m / "t").write_text("T")
    os.symlink("t", m / "rel")
    os.symlink("/etc/passwd", m / "abs")
    assert os.readlink(m / "rel") == "t" and (m / "rel").read_text() == "T"
    assert os.readlink(m / "abs") == "/etc/passwd"
    assert os.readlink(mount.backing / "abs") == "/etc/passwd"
    os.link(m / "t", m / "hard")
    assert os.stat(m / "t").st_nlink == 2 and os.stat(m / "hard").st_ino == os.stat(m / "t").st_ino
    os.link(m / "rel", m / "rel2", follow_symlinks=False)
    assert os.readlink(m / "rel2") == "t"
    os.mkdir(m / "d")
    assert errno_of(os.link, m / "d", m / "d2") == errno.EPERM
    assert errno_of(os.symlink, "x" * 5000, m / "long") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, m / ("n" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.readlink, m / "t") == errno.EINVAL


def test_chmod_chown_utimens(mount: Mount) -> None:
    f = mount.mnt / "f"
    f.write_text("x")
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(os.stat(mount.backing / "f").st_mode) == 0o4751  # root: as given
    os.chown(f, 1234, 5678)
    st = os.stat(mount.backing / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o751  # chown clears set-user-ID, as locally
    os.chown(f, -1, 42)
    assert os.stat(f).st_gid == 42 and os.stat(f).st_uid == 1234
    os.utime(f, ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert os.stat(mount.backing / "f").st_mtime_ns == 2_000_000_002
    UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

    class Ts(ctypes.Structure):
        _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]

    times = (Ts * 2)(Ts(0, UTIME_OMIT), Ts(0, UTIME_NOW))
    before = time.time_ns()
    assert libc.utimensat(-100, bytes(f), times, 0) == 0
    st = os.stat(f)
    assert st.st_atime_ns == 1_000_000_001 and st.st_mtime_ns >= before - 10**9
    os.utime(f, ns=(-5_000_000_000, 1))  # before 1970
    assert os.stat(f).st_atime_ns == -5_000_000_000
    os.symlink("f", mount.mnt / "l")
    os.chown(mount.mnt / "l", 77, 88, follow_symlinks=False)
    assert (
        os.lstat(mount.backing / "l").st_uid == 77 and os.stat(mount.backing / "f").st_uid == 1234
    )
    os.utime(mount.mnt / "l", ns=(5, 6), follow_symlinks=False)
    assert os.lstat(mount.backing / "l").st_mtime_ns == 6


def test_fallocate_truncate(mount: Mount) -> None:
    f = mount.mnt / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    os.posix_fallocate(fd, 0, 1 << 20)
    assert os.fstat(fd).st_size == 1 << 20
    os.pwrite(fd, b"z" * 8192, 0)
    os.fsync(fd)
    # punch a hole (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
    assert libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) == 0
    assert os.pread(fd, 4, 0) == bytes(4) and os.pread(fd, 1, 4096) == b"z"
    assert os.fstat(fd).st_size == 1 << 20
    os.truncate(f, 10)
    assert os.stat(f).st_size == 10 and os.stat(mount.backing / "f").st_size == 10
    os.ftruncate(fd, 3)
    os.close(fd)
    assert (mount.backing / "f").stat().st_size == 3
    assert errno_of(os.truncate, mount.mnt, 0) == errno.EISDIR


def test_unlinked_open_file_and_dirs(mount: Mount) -> None:
    m = mount.mnt
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"still here")
    os.unlink(m / "f")
    assert os.pread(fd, 100, 0) == b"still here" and os.fstat(fd).st_nlink == 0
    os.close(fd)
    os.makedirs(m / "a" / "b")
    assert errno_of(os.rmdir, m / "a") == errno.ENOTEMPTY
    assert errno_of(os.unlink, m / "a") == errno.EISDIR
    assert errno_of(os.mkdir, m / "a") == errno.EEXIST
    os.rmdir(m / "a" / "b")
    os.rmdir(m / "a")
    assert os.listdir(m) == [] and os.listdir(mount.backing) == []
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)  # FSYNCDIR
    os.close(dfd)
    fd = os.open(m / "g", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"1")
    os.fdatasync(fd)
    os.fsync(fd)
    os.close(fd)


def test_setgid_directory_inheritance(mount: Mount) -> None:
    d = mount.mnt / "shared"
    d.mkdir()
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2775)
    (d / "file").write_text("")
    (d / "sub").mkdir()
    assert os.stat(d / "file").st_gid == 4242
    st = os.stat(d / "sub")
    assert st.st_gid == 4242 and st.st_mode & stat.S_ISGID
