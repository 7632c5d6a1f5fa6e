"""A hostile guest against the server. Most attacks are raw FUSE messages (what a
guest kernel under the attacker's control can send); the kernel-path ones go through
a real mount. Each test names what it proves."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.volumes import hostfs
from fcvm.volumes import protocol as p
from fcvm.volumes.server import VolumeServer
from tests.host.volumes_harness import (
    env_fixture,
    fresh_dirs,
    serve_mount,
    start_relay,
)
from tests.unit.volumes_wire import RawClient, request

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def vol_env() -> Iterator[tuple[Path, Path]]:
    yield from env_fixture()


@pytest.fixture
def tree(vol_env: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    """root/ (served) and outside/ (its sibling, which nothing may touch): absolute and
    relative symlinks out, a directory, a file."""
    top, _ = vol_env
    root, outside = fresh_dirs(top, "root", "outside")
    (outside / "secret").write_text("secret")
    os.chmod(outside / "secret", 0o600)
    (root / "abs").symlink_to(outside / "secret")
    (root / "rel").symlink_to("../" + outside.name + "/secret")
    (root / "reldir").symlink_to("../" + outside.name)
    (root / "absdir").symlink_to(outside)
    (root / "dir").mkdir()
    (root / "file").write_text("f")
    before = fingerprint(outside)
    yield root, outside
    assert fingerprint(outside) == before, "something outside the root changed"


def fingerprint(d: Path) -> list[tuple[str, int, int, int, int, bytes, list[str]]]:
    out = []
    for dirpath, dirs, files in os.walk(d):
        for n in sorted(dirs + files):
            path = os.path.join(dirpath, n)
            st = os.lstat(path)
            data = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else b""
            xattrs = os.listxattr(path, follow_symlinks=False)
            out.append((path, st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, data, xattrs))
    st = os.lstat(d)
    out.append((str(d), st.st_mode, st.st_uid, 0, st.st_mtime_ns, b"", []))
    return out


def attr_mode(entry_body: bytes) -> int:
    return int(p.ATTR.unpack_from(entry_body, p.ENTRY_HEAD.size)[9])


def fh_of(body: bytes) -> int:
    return int(struct.unpack_from("<Q", body)[0])


SETATTR_ZERO = [0] * 16


def setattr_body(valid: int, **fields: int) -> bytes:
    names = ["valid", "pad", "fh", "size", "lock_owner", "atime", "mtime", "ctime",
             "atimensec", "mtimensec", "ctimensec", "mode", "u4", "uid", "gid", "u5"]  # fmt: skip
    vals = dict.fromkeys(names, 0)
    vals.update(fields, valid=valid)
    return p.SETATTR_IN.pack(*(vals[n] for n in names))


def test_symlinks_out_are_never_followed(tree: tuple[Path, Path]) -> None:
    """lookup/open/create/setattr/xattr on symlinks pointing outside (absolute and
    relative, to a file and to a directory) act on the link itself or fail."""
    root, outside = tree
    c = RawClient(VolumeServer(root))
    c.init()
    for name in (b"abs", b"rel", b"reldir", b"absdir"):
        node, r = c.lookup(1, name)
        assert r.error == 0 and stat.S_ISLNK(attr_mode(r.body)), name
        for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC):
            assert c.call(p.Op.OPEN, p.OPEN_IN.pack(flags, 0), nodeid=node).error == -errno.EACCES
        assert c.call(p.Op.OPENDIR, p.OPEN_IN.pack(0, 0), nodeid=node).error == -errno.ENOTDIR
        bad = [
            (p.Op.SETATTR, setattr_body(p.FATTR_MODE, mode=0o777)),
            (p.Op.SETATTR, setattr_body(p.FATTR_SIZE, size=0)),
            (p.Op.SETXATTR, p.SETXATTR_IN.pack(1, 0) + b"user.x\0" + b"1"),
        ]
        for op, body in bad:
            assert c.call(op, body, nodeid=node).error != 0, (name, op)
        # chown and times apply to the link itself (lchown/lutimes), inside the root.
        r = c.call(p.Op.SETATTR, setattr_body(p.FATTR_UID | p.FATTR_MTIME, uid=4321, mtime=7),
                   nodeid=node)  # fmt: skip
        assert r.error == 0
        assert os.lstat(root / name.decode()).st_uid == 4321
        # As a parent directory the link is not one: nothing is resolved through it.
        for op, body in [
            (p.Op.LOOKUP, b"secret\0"),
            (p.Op.CREATE, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"pwn\0"),
            (p.Op.MKDIR, p.MKDIR_IN.pack(0o755, 0) + b"pwn\0"),
            (p.Op.MKNOD, p.MKNOD_IN.pack(0o10644, 0, 0, 0) + b"pwn\0"),
            (p.Op.SYMLINK, b"pwn\0/x\0"),
            (p.Op.UNLINK, b"secret\0"),
            (p.Op.RENAME, p.RENAME_IN.pack(1) + b"secret\0stolen\0"),
        ]:
            assert c.call(op, body, nodeid=node).error == -errno.ENOTDIR, (name, op)
        r = c.call(p.Op.READLINK, nodeid=node)
        assert r.error == 0 and r.body == os.readlink(root / name.decode()).encode()
    # Names with a slash never reach the host as paths.
    for name in (b"reldir/secret", b"absdir/secret", b"../" + outside.name.encode()):
        assert c.lookup(1, name)[1].error == -errno.EINVAL
        r = c.call(p.Op.MKDIR, p.MKDIR_IN.pack(0o755, 0) + name + b"\0")
        assert r.error == -errno.EINVAL
    c.close()


def test_symlink_swapped_in_between_operations(tree: tuple[Path, Path]) -> None:
    """The host swaps a directory and a file with symlinks to outside, as fast as it
    can, while the guest looks them up and creates, opens, truncates and chmods through
    them: every operation lands inside the root or fails."""
    root, _ = tree
    (root / "dir" / "victim").write_text("v")
    stop = threading.Event()

    def swapper() -> None:
        fd = os.open(root, os.O_PATH)
        while not stop.is_set():
            for a, b in ((b"dir", b"absdir"), (b"file", b"abs"), (b"dir", b"reldir")):
                with contextlib.suppress(OSError):
                    hostfs.renameat2(fd, a, fd, b, hostfs.RENAME_EXCHANGE)
        os.close(fd)

    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    c = RawClient(VolumeServer(root))
    c.init()
    try:
        for i in range(600):
            for name in (b"dir", b"absdir", b"reldir"):
                node, r = c.lookup(1, name)
                if r.error:
                    continue
                c.call(p.Op.CREATE, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"pwn%d\0" % i,
                       nodeid=node)  # fmt: skip
                c.call(p.Op.MKDIR, p.MKDIR_IN.pack(0o755, 0) + b"pwnd%d\0" % i, nodeid=node)
                child, r = c.lookup(node, b"secret")
                if child:
                    c.call(p.Op.SETATTR, setattr_body(p.FATTR_MODE | p.FATTR_SIZE, mode=0o777),
                           nodeid=child)  # fmt: skip
                    c.call(p.Op.OPEN, p.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0), nodeid=child)
                c.call(p.Op.UNLINK, b"secret\0", nodeid=node)
            for name in (b"file", b"abs"):
                node, r = c.lookup(1, name)
                if node:
                    c.call(p.Op.OPEN, p.OPEN_IN.pack(os.O_RDWR | os.O_TRUNC, 0), nodeid=node)
                    c.call(p.Op.SETATTR, setattr_body(p.FATTR_MODE, mode=0o4777), nodeid=node)
                # CREATE without O_EXCL of a name that may be a symlink right now.
                c.call(p.Op.CREATE, p.CREATE_IN.pack(os.O_RDWR | os.O_TRUNC, 0o100644, 0, 0)
                       + name + b"\0", nodeid=1)  # fmt: skip
    finally:
        stop.set()
        t.join()
        c.close()


def test_dotdot_at_the_root(tree: tuple[Path, Path], vol_env: tuple[Path, Path]) -> None:
    """'..' of the root is the root; '..' of a directory moved out of the root by the
    host is not named at all."""
    root, _ = tree
    (elsewhere,) = fresh_dirs(vol_env[0], "elsewhere")
    c = RawClient(VolumeServer(root))
    c.init()
    root_ino = os.stat(root).st_ino
    for parent in (1,):
        node, r = c.lookup(parent, b"..")
        assert node == 1 and p.ATTR.unpack_from(r.body, p.ENTRY_HEAD.size)[0] == root_ino
    dirnode, _ = c.lookup(1, b"dir")
    assert c.lookup(dirnode, b"..")[0] == 1
    assert c.lookup(dirnode, b".")[0] == dirnode
    os.rename(root / "dir", elsewhere / "moved")
    try:
        assert c.lookup(dirnode, b"..")[1].error == -errno.ENOENT
    finally:
        os.rename(elsewhere / "moved", root / "dir")
    c.close()


def test_forged_and_stale_ids(tree: tuple[Path, Path]) -> None:
    """Unknown, forgotten and other nodes' ids and handles are errors, never another
    inode; a FORGET while a file is open does not free the descriptor it uses."""
    root, _ = tree
    c = RawClient(VolumeServer(root))
    c.init()
    getattr_in = p.GETATTR_IN.pack(0, 0, 0)
    for nodeid in (0, 2, 999, 2**63, 2**64 - 1):
        assert c.call(p.Op.GETATTR, getattr_in, nodeid=nodeid).error == -errno.ESTALE
    f, _ = c.lookup(1, b"file")
    d, _ = c.lookup(1, b"dir")
    fh = fh_of(c.call(p.Op.OPEN, p.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=f).body)
    dfh = fh_of(c.call(p.Op.OPENDIR, p.OPEN_IN.pack(0, 0), nodeid=d).body)
    read = p.READ_IN.pack
    for bad_fh, nodeid in ((fh + 1000, f), (dfh, f), (fh, d), (0, f), (2**64 - 1, f)):
        r = c.call(p.Op.READ, read(bad_fh, 0, 10, 0, 0, 0, 0), nodeid=nodeid)
        assert r.error == -errno.EBADF, (bad_fh, nodeid)
    # A forged FORGET (far more than looked up) while open: the handle keeps working.
    c.send_raw(request(p.Op.FORGET, p.FORGET_IN.pack(10**9), nodeid=f, unique=5))
    assert c.call(p.Op.GETATTR, getattr_in, nodeid=f).error == -errno.ESTALE
    for _ in range(20):  # new inodes get new descriptors; the old one is still held
        c.lookup(1, b"abs")
        c.call(p.Op.OPENDIR, p.OPEN_IN.pack(0, 0), nodeid=d)
    r = c.call(p.Op.READ, read(fh, 0, 10, 0, 0, 0, 0), nodeid=f)
    assert r.error == 0 and r.body == b"f"
    assert c.call(p.Op.RELEASE, p.RELEASE_IN.pack(fh, 0, 0, 0), nodeid=f).error == 0
    r = c.call(p.Op.READ, read(fh, 0, 10, 0, 0, 0, 0), nodeid=f)
    assert r.error == -errno.EBADF  # released: gone for good
    f2, _ = c.lookup(1, b"file")
    assert f2 != f  # node ids are never reused
    c.close()


def test_special_files_are_never_opened(tree: tuple[Path, Path]) -> None:
    """Device nodes, fifos and sockets made through the map are not opened on the host
    (a fifo open would block the server; a device open would reach host hardware)."""
    root, _ = tree
    c = RawClient(VolumeServer(root))
    c.init()
    specials = {
        b"zero": (stat.S_IFCHR | 0o666, p.new_encode_dev(1, 5)),
        b"fifo": (stat.S_IFIFO | 0o666, 0),
        b"sock": (stat.S_IFSOCK | 0o666, 0),
    }
    for name, (mode, rdev) in specials.items():
        r = c.call(p.Op.MKNOD, p.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0")
        assert r.error == 0, name
        node = fh_of(r.body)
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
            assert c.call(p.Op.OPEN, p.OPEN_IN.pack(flags, 0), nodeid=node).error == -errno.EACCES
        r = c.call(p.Op.CREATE, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + name + b"\0")
        assert r.error == -errno.EACCES, name
        assert c.call(p.Op.SETATTR, setattr_body(p.FATTR_SIZE, size=0), nodeid=node).error != 0
    assert stat.S_ISCHR(os.lstat(root / "zero").st_mode)
    c.close()


def test_malformed_messages_end_one_mapping_only(
    tree: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Malformed, truncated and oversized messages end that mapping with a logged reason;
    another mapping in the same process carries on."""
    root, _ = tree
    caplog.set_level(logging.INFO, logger="fcvm")
    good = RawClient(VolumeServer(root))
    good.init()
    cases = {
        "exceeds the limit": struct.pack("<I", p.MAX_REQUEST + 1) + bytes(36),
        "shorter than its header": struct.pack("<I", 8) + bytes(36),
        "malformed LOOKUP": request(p.Op.LOOKUP, b"no terminator"),
        "malformed SETATTR": request(p.Op.SETATTR, bytes(20)),
        "malformed BATCH_FORGET": request(p.Op.BATCH_FORGET, struct.pack("<II", 10**6, 0)),
        "malformed WRITE": request(p.Op.WRITE, p.WRITE_IN.pack(1, 0, 10**6, 0, 0, 0, 0) + b"x"),
        "truncated message at EOF": request(p.Op.GETATTR, bytes(16))[:45],
    }
    for reason, msg in cases.items():
        bad = RawClient(VolumeServer(root))
        bad.init()
        bad.send_raw(msg)
        if reason.startswith("truncated"):
            bad.sock.shutdown(socket.SHUT_WR)
        bad.thread.join(10)
        assert not bad.thread.is_alive()
        assert bad.server.end_reason is not None and reason in bad.server.end_reason
        assert any(reason in r.getMessage() for r in caplog.records), reason
        bad.close()
        assert good.lookup(1, b"file")[1].error == 0  # the other mapping is fine
    good.close()


def test_many_open_files_cannot_exhaust_host_fds(vol_env: tuple[Path, Path]) -> None:
    """A guest that opens and looks up thousands of files gets EMFILE/ENFILE from the
    caps; the server process's descriptor count stays bounded."""
    top, relay = vol_env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    for i in range(1500):
        (backing / f"f{i}").touch()
    base = len(os.listdir("/proc/self/fd"))
    with serve_mount(relay, backing, mnt, max_handles=200, max_nodes=400) as m:
        fds, errors = [], set()
        for i in range(1500):
            try:
                fds.append(os.open(m.mnt / f"f{i}", os.O_RDONLY))
            except OSError as e:
                errors.add(e.errno)
        assert len(fds) <= 200 and errors <= {errno.EMFILE, errno.ENFILE} and errors
        # Our own descriptors: the client's fds + the server's (capped) ones.
        server_fds = len(os.listdir("/proc/self/fd")) - base - len(fds)
        assert server_fds <= 200 + 400 + 10, server_fds
        for fd in fds:
            os.close(fd)
        stat_errors = set()
        for i in range(1500):
            try:
                os.stat(m.mnt / f"f{i}")
            except OSError as e:
                stat_errors.add(e.errno)
        assert stat_errors <= {errno.ENFILE}
        assert len(os.listdir("/proc/self/fd")) - base <= 400 + 10


UNPRIV_SERVER = r"""
import os, socket, sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from fcvm.volumes.server import VolumeServer  # before dropping privileges: the Python
uid = int(sys.argv[2])                         # install may not be readable by uid
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
s = socket.socket(fileno=int(sys.argv[1]))
srv = VolumeServer(Path(sys.argv[4]))
srv.serve(s)
print(srv.end_reason, flush=True)
"""
UID = 43210


def test_unprivileged_server_cannot_gain_setuid(vol_env: tuple[Path, Path]) -> None:
    """The server as an unprivileged user U: guest root is U (files show as uid 0),
    new files are U's, set-user/group-ID bits never land on non-directories (create,
    chmod, mknod), writes clear them (host kernel), chown to others is EPERM."""
    top, relay = vol_env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    os.chown(backing, UID, UID)
    (backing / "suid").write_text("#!/bin/sh\n")
    os.chown(backing / "suid", UID, UID)
    os.chmod(backing / "suid", 0o4755)
    (backing / "rootfile").write_text("r")
    ours, theirs = socket.socketpair()
    src = Path(__file__).resolve().parents[2] / "src"
    server = subprocess.Popen(
        [sys.executable, "-c", UNPRIV_SERVER, str(theirs.fileno()), str(UID), str(src),
         str(backing)],
        pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    theirs.close()
    relay_proc = start_relay(relay, mnt, ours, ro=False)
    ours.close()
    try:
        b, m = backing, mnt
        st = os.stat(m / "suid")
        assert (st.st_uid, st.st_gid) == (0, 0)  # U shows as root
        assert os.stat(m / "rootfile").st_uid == 65534  # host root is nobody
        fd = os.open(m / "new", os.O_CREAT | os.O_WRONLY, 0o6755)
        os.close(fd)
        hst = os.stat(b / "new")
        assert (hst.st_uid, stat.S_IMODE(hst.st_mode)) == (UID, 0o755)
        os.chmod(m / "new", 0o6777)
        assert stat.S_IMODE(os.stat(b / "new").st_mode) == 0o777
        os.mknod(m / "node", stat.S_IFREG | 0o4755)
        assert stat.S_IMODE(os.stat(b / "node").st_mode) == 0o755
        os.mkdir(m / "sgid")
        os.chmod(m / "sgid", 0o2775)
        assert os.stat(b / "sgid").st_mode & stat.S_ISGID  # directories keep set-group-ID
        with open(m / "suid", "a") as f:
            f.write("echo\n")
        assert not os.stat(b / "suid").st_mode & stat.S_ISUID  # the write cleared it
        with pytest.raises(PermissionError):
            os.chown(m / "new", 1000, -1)
        os.chown(m / "new", 0, 0)  # to guest root = U: a no-op that works
        assert os.stat(b / "new").st_uid == UID
        with pytest.raises(PermissionError):
            os.mknod(m / "dev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with pytest.raises(PermissionError):  # trusted.* needs the host's root
            os.setxattr(m / "new", "trusted.x", b"1")
    finally:
        relay_proc.terminate()
        relay_proc.wait(10)
        out = server.communicate(timeout=20)[0]
    assert server.returncode == 0 and out.strip() in ("EOF", "stopped")
