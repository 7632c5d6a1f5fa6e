"""The server's protocol handling without a kernel: INIT negotiation, forgets,
READDIRPLUS lookup counting, unknown opcodes, requests before INIT, DESTROY."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from fcvm.volumes import protocol as p
from fcvm.volumes.server import VolumeServer
from tests.unit.volumes_wire import RawClient, init_body

pytestmark = pytest.mark.unit


def test_init_negotiation(tmp_path: Path) -> None:
    c = RawClient(VolumeServer(tmp_path))  # (no writeback cache: fcvm's default)
    assert c.call(p.Op.GETATTR, bytes(16)).error == -errno.EIO  # before INIT
    r = c.call(p.Op.INIT, p.INIT_IN_COMPAT.pack(8, 0, 0, 0))  # a newer major: ours only
    assert r.error == 0 and struct.unpack_from("<II", r.body) == (7, p.OUR_MINOR)
    r = c.call(p.Op.INIT, init_body(minor=45))
    major, minor, readahead, flags, _, _, max_write, gran, max_pages = struct.unpack_from(
        "<IIIIHHIIH", r.body
    )
    assert (major, minor, readahead, max_write, gran, max_pages) == (7, 36, 131072, 1 << 20, 1, 256)
    assert flags & p.POSIX_LOCKS and flags & p.MAX_PAGES_FLAG and not flags & p.WRITEBACK_CACHE
    assert not flags & (p.EXPORT_SUPPORT | p.HANDLE_KILLPRIV | p.DONT_MASK)
    assert c.call(p.Op.INIT, init_body()).error == -errno.EPROTO  # only once
    assert c.call(p.Op.GETATTR, bytes(16)).error == 0
    for op in (p.Op.IOCTL, p.Op.BMAP, p.Op.POLL, p.Op.TMPFILE, 4096, 9999):
        assert c.call(op, bytes(64)).error == -errno.ENOSYS
    assert c.call(p.Op.DESTROY).error == 0
    c.close()
    assert c.server.end_reason == "EOF"


def test_old_kernels_are_refused(tmp_path: Path) -> None:
    c = RawClient(VolumeServer(tmp_path))
    assert c.call(p.Op.INIT, init_body(minor=30)).error == -errno.EPROTO
    c.thread.join(5)
    assert c.server.end_reason is not None and "7.30" in c.server.end_reason
    c.close()


def test_only_flags_the_kernel_offers(tmp_path: Path) -> None:
    c = RawClient(VolumeServer(tmp_path, writeback=True))
    r = c.call(p.Op.INIT, init_body(flags=p.POSIX_LOCKS | p.WRITEBACK_CACHE))
    assert struct.unpack_from("<I", r.body, 12)[0] == p.POSIX_LOCKS | p.WRITEBACK_CACHE
    c.close()


def test_readdirplus_counts_lookups_and_forgets_drop_them(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    server = VolumeServer(tmp_path)
    c = RawClient(server)
    c.init()
    fh = struct.unpack_from("<Q", c.call(p.Op.OPENDIR, p.OPEN_IN.pack(0, 0)).body)[0]
    body = c.call(p.Op.READDIRPLUS, p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)).body
    nodeids, names, pos = [], [], 0
    while pos < len(body):
        nodeid = struct.unpack_from("<Q", body, pos)[0]
        _, _, namelen, _ = p.DIRENT_HEAD.unpack_from(body, pos + p.ENTRY_SIZE)
        start = pos + p.ENTRY_SIZE + p.DIRENT_HEAD.size
        names.append(body[start : start + namelen])
        nodeids.append(nodeid)
        pos += p.dirent_size(names[-1], True)
    assert sorted(names) == sorted([b".", b"..", *(b"f%d" % i for i in range(5))])
    assert nodeids[names.index(b".")] == 0 and nodeids[names.index(b"..")] == 0
    assert server._ops is not None and len(server._ops.nodes) == 6
    # The same names looked up again: same ids, one more lookup each.
    assert c.lookup(1, b"f0")[0] == nodeids[names.index(b"f0")]
    live = [n for n in nodeids if n]
    forgets = b"".join(p.FORGET_ONE.pack(n, 1) for n in live)
    c.send_raw(
        p.IN_HEADER.pack(40 + 8 + len(forgets), p.Op.BATCH_FORGET, 0, 0, 0, 0, 0, 0, 0)
        + p.BATCH_FORGET_IN.pack(len(live), 0)
        + forgets
    )
    c.send_raw(
        p.IN_HEADER.pack(48, p.Op.FORGET, 0, nodeids[names.index(b"f0")], 0, 0, 0, 0, 0)
        + p.FORGET_IN.pack(1)
    )
    assert c.call(p.Op.RELEASEDIR, p.RELEASE_IN.pack(fh, 0, 0, 0)).error == 0
    assert len(server._ops.nodes) == 1  # only the root
    c.close()


def test_create_is_owned_by_the_caller_and_exact_mode(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    os.umask(0o077)  # fcvm's umask plays no part
    try:
        c = RawClient(VolumeServer(tmp_path))
        c.init()
        r = c.call(p.Op.CREATE, p.CREATE_IN.pack(os.O_RDWR, 0o100755, 0, 0) + b"new\0",
                   uid=1234, gid=4321)  # fmt: skip
        assert r.error == 0
        st = os.stat(tmp_path / "new")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 4321, 0o755)
        r = c.call(p.Op.MKDIR, p.MKDIR_IN.pack(0o775, 0) + b"d\0", uid=5, gid=6)
        st = os.stat(tmp_path / "d")
        assert r.error == 0 and (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5, 6, 0o775)
        c.close()
    finally:
        os.umask(0o022)


def test_caps_fit_the_fd_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from fcvm.volumes import server as srv

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    nodes, handles = srv.fd_budget(32768, 4096)
    assert nodes + handles <= 1024 - srv.FD_RESERVE and handles >= 16
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert srv.fd_budget(32768, 4096) == (32768, 4096)
