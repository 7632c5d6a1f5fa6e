"""Read-only maps (the kernel's ro mount and the server's own check), the writeback
cache switch, and coherence between the mount and the host directory."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm.volumes import protocol as p
from fcvm.volumes.server import VolumeServer
from tests.host.volumes_harness import (
    env_fixture,
    fresh_dirs,
    mounted,
    serve_mount,
    wait_for,
)
from tests.unit.volumes_wire import RawClient

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def vol_env() -> Iterator[tuple[Path, Path]]:
    yield from env_fixture()


def errno_of(fn: object, *args: object, **kw: object) -> int:
    try:
        fn(*args, **kw)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


def populate(d: Path) -> None:
    (d / "f").write_text("data")
    (d / "dir").mkdir()
    (d / "dir" / "inner").write_text("")
    os.setxattr(d / "f", "user.k", b"v")


def test_read_only_mount(vol_env: tuple[Path, Path]) -> None:
    top, relay = vol_env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    populate(backing)
    with serve_mount(relay, backing, mnt, read_only=True) as m:
        r = m.mnt
        assert (r / "f").read_text() == "data" and os.getxattr(r / "f", "user.k") == b"v"
        assert not m.server.writeback
        attempts = [
            (os.open, r / "new", os.O_CREAT | os.O_WRONLY),
            (os.open, r / "f", os.O_WRONLY),
            (os.open, r / "f", os.O_RDONLY | os.O_TRUNC),
            (os.mkdir, r / "d2"),
            (os.rmdir, r / "dir"),
            (os.unlink, r / "f"),
            (os.rename, r / "f", r / "g"),
            (os.symlink, "f", r / "l"),
            (os.link, r / "f", r / "h"),
            (os.mkfifo, r / "fifo"),
            (os.chmod, r / "f", 0o777),
            (os.chown, r / "f", 1, 1),
            (os.utime, r / "f", (1, 1)),
            (os.truncate, r / "f", 0),
            (os.setxattr, r / "f", "user.x", b"1"),
            (os.removexattr, r / "f", "user.k"),
        ]
        for fn, *args in attempts:
            assert errno_of(fn, *args) == errno.EROFS, (fn, args)
    assert sorted(os.listdir(backing)) == ["dir", "f"] and (backing / "f").read_text() == "data"


def _fh_of(reply_body: bytes) -> int:
    return int(struct.unpack_from("<Q", reply_body)[0])


def test_read_only_is_enforced_by_the_server(vol_env: tuple[Path, Path]) -> None:
    """Raw messages straight to a read-only server, as a guest that ignores its own ro
    mount would send them: every modifying request is EROFS from the host side."""
    top, _ = vol_env
    (backing,) = fresh_dirs(top, "back")
    populate(backing)
    before = sorted(os.walk(backing))
    c = RawClient(VolumeServer(backing, read_only=True))
    c.init()
    f, _ = c.lookup(1, b"f")
    d, _ = c.lookup(1, b"dir")
    fh = _fh_of(c.call(p.Op.OPEN, p.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=f).body)
    name = b"x\0"
    setattr_size = p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    setattr_mode = p.SETATTR_IN.pack(p.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 0, 0, 0)
    cases = [
        (p.Op.SETATTR, setattr_size, f),
        (p.Op.SETATTR, setattr_mode, f),
        (p.Op.CREATE, p.CREATE_IN.pack(os.O_WRONLY, 0o100644, 0, 0) + name, 1),
        (p.Op.MKNOD, p.MKNOD_IN.pack(0o10644, 0, 0, 0) + name, 1),
        (p.Op.MKDIR, p.MKDIR_IN.pack(0o755, 0) + name, 1),
        (p.Op.SYMLINK, name + b"target\0", 1),
        (p.Op.LINK, p.LINK_IN.pack(f) + name, 1),
        (p.Op.UNLINK, b"f\0", 1),
        (p.Op.RMDIR, b"dir\0", 1),
        (p.Op.RENAME, p.RENAME_IN.pack(1) + b"f\0g\0", 1),
        (p.Op.RENAME2, p.RENAME2_IN.pack(d, 0, 0) + b"f\0g\0", 1),
        (p.Op.OPEN, p.OPEN_IN.pack(os.O_RDWR, 0), f),
        (p.Op.OPEN, p.OPEN_IN.pack(os.O_RDONLY | os.O_TRUNC, 0), f),
        (p.Op.WRITE, p.WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0) + b"abc", f),
        (p.Op.SETXATTR, p.SETXATTR_IN.pack(1, 0) + b"user.x\0" + b"1", f),
        (p.Op.REMOVEXATTR, b"user.k\0", f),
        (p.Op.FALLOCATE, p.FALLOCATE_IN.pack(fh, 0, 4096, 0, 0), f),
        (p.Op.ACCESS, p.ACCESS_IN.pack(os.W_OK, 0), f),
    ]
    for op, body, nodeid in cases:
        r = c.call(op, body, nodeid=nodeid)
        assert r.error == -errno.EROFS, (op.name, r)
    # Reading still works.
    r = c.call(p.Op.READ, p.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid=f)
    assert r.error == 0 and r.body == b"data"
    c.close()
    assert sorted(os.walk(backing)) == before and (backing / "f").read_text() == "data"
    assert os.listxattr(backing / "f") == ["user.k"]


@pytest.mark.parametrize("writeback", [True, False])
def test_coherence(vol_env: tuple[Path, Path], writeback: bool) -> None:
    """Writes through the mount reach the host when write(2) returns (no writeback
    cache) or at close/fsync (writeback cache). Host-side changes show through the
    mount within a second: new and removed names at once, changed data for the next
    open (and, without the writeback cache, for descriptors already open)."""
    top, relay = vol_env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    with serve_mount(relay, backing, mnt, writeback=writeback) as m:
        flags = m.server.negotiated[1] if m.server.negotiated else 0
        assert bool(flags & p.WRITEBACK_CACHE) == writeback
        fd = os.open(mnt / "w", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"abc")
        if not writeback:
            assert (backing / "w").read_bytes() == b"abc"
        os.fsync(fd)
        assert (backing / "w").read_bytes() == b"abc"
        os.write(fd, b"def")
        os.close(fd)
        assert (backing / "w").read_bytes() == b"abcdef"

        (backing / "f").write_text("one")
        assert (mnt / "f").read_text() == "one"
        held = os.open(mnt / "f", os.O_RDONLY)
        time.sleep(0.05)
        (backing / "f").write_text("two, longer")
        (backing / "new").write_text("n")
        os.unlink(backing / "w")
        assert (mnt / "new").read_text() == "n"  # no negative entries are cached
        assert wait_for(lambda: not (mnt / "w").exists(), timeout=1.5)
        assert wait_for(lambda: (mnt / "f").read_text() == "two, longer", timeout=1.5)
        if not writeback:
            assert wait_for(lambda: os.pread(held, 100, 0) == b"two, longer", timeout=1.5)
        os.close(held)
        st, host = os.stat(mnt / "f"), os.stat(backing / "f")
        assert (st.st_size, st.st_mtime_ns) == (host.st_size, host.st_mtime_ns)
        os.mkdir(backing / "dir")
        assert wait_for(lambda: (mnt / "dir").is_dir(), timeout=1.5)


def test_host_appends_and_truncation_survive_a_guest_appender(vol_env: tuple[Path, Path]
                                                              ) -> None:  # fmt: skip
    """fcvm's default (no writeback cache): a guest process appending to a file keeps
    what a host process appends between its writes, and a host truncation stays
    (a shared log, logrotate's copytruncate). Under the writeback cache the guest kernel
    would write at the end it cached, over the host's data."""
    top, relay = vol_env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    with serve_mount(relay, backing, mnt) as m:
        assert not m.server.writeback
        fd = os.open(mnt / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        try:
            for i in range(3):
                os.write(fd, f"guest{i}\n".encode())
                with open(backing / "log", "a") as host:
                    host.write(f"host{i}\n")
            expected = "".join(f"guest{i}\nhost{i}\n" for i in range(3))
            assert (backing / "log").read_text() == expected
            os.truncate(backing / "log", 0)
            os.write(fd, b"after\n")
        finally:
            os.close(fd)
        assert (backing / "log").read_text() == "after\n"
        assert (mnt / "log").read_text() == "after\n"


def test_relay_ends_with_the_stream(vol_env: tuple[Path, Path]) -> None:
    """When the host side goes away, the relay unmounts (lazily) and exits 0 by itself."""
    top, relay = vol_env
    backing, mnt = fresh_dirs(top, "back", "mnt")
    with serve_mount(relay, backing, mnt) as m:
        (mnt / "f").write_text("x")
        m.server.stop()
        m.thread.join(10)
        m.sock.close()
        assert m.relay.wait(timeout=10) == 0
        assert wait_for(lambda: not mounted(mnt), timeout=5)
        assert m.server.end_reason == "stopped"


def test_relay_usage_errors(vol_env: tuple[Path, Path]) -> None:
    top, relay = vol_env
    (mnt,) = fresh_dirs(top, "mnt")
    for argv in ([], [str(mnt)], [str(mnt), "999"], [str(mnt), "x"], ["--ro", str(mnt)]):
        proc = subprocess.run([str(relay), *argv], capture_output=True, timeout=10)
        assert proc.returncode == 2 and proc.stdout == b"", argv
    a, b = socket.socketpair()
    try:
        proc = subprocess.run(
            [str(relay), str(top / "missing"), str(b.fileno())],
            capture_output=True, pass_fds=(b.fileno(),), timeout=10,
        )  # fmt: skip
    finally:
        a.close()
        b.close()
    assert proc.returncode == 1 and proc.stdout == b"" and b"mount" in proc.stderr
