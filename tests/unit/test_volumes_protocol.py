"""The FUSE wire format and the lock table, without sockets."""

from __future__ import annotations

import struct

import pytest

from fcvm.volumes import protocol as p
from fcvm.volumes.locks import OFFSET_MAX, RDLCK, UNLCK, WRLCK, Lock, LockTable, TooManyLocks
from tests.unit.volumes_wire import request

pytestmark = pytest.mark.unit


def test_struct_sizes_match_fuse_h() -> None:
    sizes = {
        p.IN_HEADER: 40, p.OUT_HEADER: 16, p.ATTR: 88, p.SETATTR_IN: 88, p.READ_IN: 40,
        p.WRITE_IN: 40, p.LK_IN: 48, p.LK_OUT: 24, p.STATFS_OUT: 80, p.INIT_OUT: 64,
        p.OPEN_OUT: 16, p.RELEASE_IN: 24, p.FLUSH_IN: 24, p.FALLOCATE_IN: 32,
        p.LSEEK_IN: 24, p.CREATE_IN: 16, p.MKNOD_IN: 16, p.GETATTR_IN: 16,
        p.RENAME2_IN: 16, p.DIRENT_HEAD: 24,
    }  # fmt: skip
    for st, size in sizes.items():
        assert st.size == size, st.format
    assert p.ENTRY_SIZE == 128


def test_parse_header_bounds() -> None:
    h = p.parse_header(request(p.Op.GETATTR, bytes(16), unique=7, nodeid=9, uid=3, gid=4))
    assert (h.length, h.opcode, h.unique, h.nodeid, h.uid, h.gid) == (56, 3, 7, 9, 3, 4)
    with pytest.raises(p.Malformed, match="shorter than its header"):
        p.parse_header(struct.pack("<I", 39) + bytes(36))
    with pytest.raises(p.Malformed, match="exceeds the limit"):
        p.parse_header(struct.pack("<I", p.MAX_REQUEST + 1) + bytes(36))
    with pytest.raises(p.Malformed, match="header of 10 bytes"):
        p.parse_header(bytes(10))
    bad_ext = p.IN_HEADER.pack(48, 1, 1, 1, 0, 0, 0, 2, 0)  # 16 bytes of extensions in 8
    with pytest.raises(p.Malformed, match="extension"):
        p.parse_header(bad_ext)


def test_body_cursor() -> None:
    b = p.Body(memoryview(b"abc\0" + bytes(8) + b"xyz"))
    assert b.cstring(10) == b"abc"
    assert b.unpack(p.FORGET_IN) == (0,)
    with pytest.raises(p.Malformed, match="NUL"):
        b.cstring(10)
    with pytest.raises(p.Malformed):
        p.Body(memoryview(b"a" * 20 + b"\0")).cstring(10)  # longer than the limit
    with pytest.raises(p.Malformed, match="too short"):
        p.Body(memoryview(bytes(4))).unpack(p.FORGET_IN)
    with pytest.raises(p.Malformed):
        p.Body(memoryview(bytes(4))).take(5)


def test_dirent_alignment_and_dev_encoding() -> None:
    d = p.pack_dirent(5, 1, 8, b"abc")
    assert len(d) == 32 == p.dirent_size(b"abc", False)
    assert p.dirent_size(b"abc", True) == 160
    for major, minor in [(1, 3), (8, 0), (259, 70000), (4095, 0xFFFFF)]:
        assert p.new_decode_dev(p.new_encode_dev(major, minor)) == (major, minor)


def test_error_reply_clamps_errno() -> None:
    assert p.OUT_HEADER.unpack(p.error_reply(1, 2)) == (16, -2, 1)
    assert p.OUT_HEADER.unpack(p.error_reply(1, 0))[1] == -5
    assert p.OUT_HEADER.unpack(p.error_reply(1, 99999))[1] == -5


def test_attr_negative_times() -> None:
    a = p.Attr(1, 0, 0, -1, 1_500_000_000, 0, 0o100644, 1, 0, 0, 0, 4096)
    fields = p.ATTR.unpack(p.pack_attr(a))
    assert fields[3] == -1 and fields[6] == 999_999_999  # -1 ns = -1 s + 999999999 ns
    assert fields[4] == 1 and fields[7] == 500_000_000


def lk(owner: int, start: int, end: int, t: int) -> Lock:
    return Lock(owner, start, end, t, pid=owner * 10, fh=owner)


def test_lock_split_merge_and_conflicts() -> None:
    t = LockTable()
    t.apply(1, lk(1, 0, 99, WRLCK))
    t.apply(1, lk(1, 40, 59, UNLCK))  # split in two
    assert [(x.start, x.end) for x in t.held_by(1)] == [(0, 39), (60, 99)]
    assert t.conflict(1, lk(2, 50, 50, WRLCK)) is None
    held = t.conflict(1, lk(2, 30, 45, RDLCK))
    assert held is not None and (held.start, held.end, held.pid) == (0, 39, 10)
    t.apply(1, lk(1, 40, 59, WRLCK))  # merges back into one
    assert [(x.start, x.end) for x in t.held_by(1)] == [(0, 99)]
    t.apply(1, lk(1, 50, OFFSET_MAX, RDLCK))  # downgrade the tail
    types = sorted((x.start, x.type) for x in t.held_by(1))
    assert types == [(0, WRLCK), (50, RDLCK)]
    t.apply(1, lk(2, 200, 300, RDLCK))  # shared locks coexist
    assert t.conflict(1, lk(3, 250, 250, RDLCK)) is None
    assert t.release_owner(1, 1) and len(t) == 1
    assert t.release_fh(1, 2) and len(t) == 0


def test_lock_cap() -> None:
    t = LockTable(max_locks=3)
    for i in range(3):
        t.apply(1, lk(1, i * 10, i * 10 + 1, WRLCK))
    with pytest.raises(TooManyLocks):
        t.apply(1, lk(1, 100, 101, WRLCK))
    t.apply(1, lk(1, 0, 1, UNLCK))  # shrinking always works
    assert len(t) == 2
