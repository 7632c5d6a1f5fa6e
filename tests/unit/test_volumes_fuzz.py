"""Fuzzing the host-side decoder: whatever bytes the guest sends, serve() ends cleanly
(never raises, never hangs, leaks no descriptor) and touches nothing outside its root.

Two generators: raw random bytes (mostly rejected at the header), and well-framed
messages with random opcodes, node ids, handles and bodies after a real INIT (these
reach every handler's decoding and checks).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcvm.volumes import protocol as p
from fcvm.volumes.server import VolumeServer
from tests.unit.volumes_wire import init_body, request

pytestmark = pytest.mark.unit

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

THREAD_ERRORS: list[BaseException | None] = []


@pytest.fixture(autouse=True)
def no_thread_exceptions() -> Iterator[None]:
    old = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        THREAD_ERRORS.append(args.exc_value)

    threading.excepthook = hook
    THREAD_ERRORS.clear()
    yield
    threading.excepthook = old
    assert not THREAD_ERRORS, THREAD_ERRORS


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/ (served) with a few entries, and outside/ next to it that must not change."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "sub", outside):
        d.mkdir(parents=True)
    (root / "f").write_bytes(b"x" * 100)
    (root / "sub" / "g").write_bytes(b"y")
    (root / "up").symlink_to("../outside")
    (outside / "secret").write_bytes(b"s")
    return root, outside


def snapshot(d: Path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out.append((os.path.join(dirpath, n), st.st_mode, st.st_size))
    return sorted(out)


def run_server(root: Path, data: bytes, chunks: list[int]) -> VolumeServer:
    """Send `data` (in pieces), then EOF; drain replies; serve() must return."""
    fds_before = len(os.listdir("/proc/self/fd"))
    server = VolumeServer(root)
    ours, theirs = socket.socketpair()
    t = threading.Thread(target=server.serve, args=(theirs,), daemon=True)
    t.start()
    drained = threading.Thread(target=_drain, args=(ours,), daemon=True)
    drained.start()
    pos = 0
    for n in [*chunks, len(data)]:
        if pos >= len(data):
            break
        try:
            ours.sendall(data[pos : pos + n])
        except OSError:
            break  # the server ended the mapping early and is gone
        pos += n
    ours.shutdown(socket.SHUT_WR)
    t.join(20)
    assert not t.is_alive(), "serve() hung"
    ours.close()
    theirs.close()
    drained.join(5)
    assert server.end_reason is not None
    assert len(os.listdir("/proc/self/fd")) == fds_before, "descriptor leak"
    return server


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(1, 300), max_size=10))
def test_random_bytes(tree: tuple[Path, Path], data: bytes, chunks: list[int]) -> None:
    root, outside = tree
    before = snapshot(outside)
    run_server(root, data, chunks)
    assert snapshot(outside) == before


NAMES = st.sampled_from([b"f", b"sub", b"g", b"up", b"new", b".", b"..", b"", b"a/b", b"x" * 300])
OPCODES = st.one_of(st.sampled_from([int(o) for o in p.Op]), st.integers(0, 5000))
U64S = st.one_of(
    st.integers(0, 8), st.sampled_from([2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1])
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(NAMES) + b"\0" + draw(st.one_of(st.just(b""), NAMES.map(lambda n: n + b"\0")))
    # Plausible fixed structs: u64/u32 fields from interesting values, then maybe names.
    fields = draw(st.lists(U64S, min_size=1, max_size=11))
    raw = b"".join(struct.pack("<Q", v) for v in fields)
    if kind == 3:
        raw += draw(NAMES) + b"\0" + draw(st.binary(max_size=64))
    return raw


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    body = draw(bodies())
    ids = st.integers(0, 70000)
    msg = request(
        draw(OPCODES), body, unique=draw(st.integers(0, 2**64 - 1)), nodeid=draw(U64S),
        uid=draw(ids), gid=draw(ids),
    )  # fmt: skip
    if draw(st.integers(0, 20)) == 0:  # now and then a lying length
        msg = struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + msg[4:]
    return msg


# Per-opcode fixed structs, so a message gets past its struct and into the handler.
STRUCTS: dict[int, struct.Struct | None] = {
    p.Op.LOOKUP: None, p.Op.GETATTR: p.GETATTR_IN, p.Op.SETATTR: p.SETATTR_IN,
    p.Op.READLINK: None, p.Op.SYMLINK: None, p.Op.MKNOD: p.MKNOD_IN, p.Op.MKDIR: p.MKDIR_IN,
    p.Op.UNLINK: None, p.Op.RMDIR: None, p.Op.RENAME: p.RENAME_IN, p.Op.RENAME2: p.RENAME2_IN,
    p.Op.LINK: p.LINK_IN, p.Op.OPEN: p.OPEN_IN, p.Op.CREATE: p.CREATE_IN, p.Op.READ: p.READ_IN,
    p.Op.WRITE: p.WRITE_IN, p.Op.STATFS: None, p.Op.RELEASE: p.RELEASE_IN,
    p.Op.FSYNC: p.FSYNC_IN, p.Op.SETXATTR: p.SETXATTR_IN, p.Op.GETXATTR: p.GETXATTR_IN,
    p.Op.LISTXATTR: p.GETXATTR_IN, p.Op.REMOVEXATTR: None, p.Op.FLUSH: p.FLUSH_IN,
    p.Op.OPENDIR: p.OPEN_IN, p.Op.READDIR: p.READ_IN, p.Op.READDIRPLUS: p.READ_IN,
    p.Op.RELEASEDIR: p.RELEASE_IN, p.Op.FSYNCDIR: p.FSYNC_IN, p.Op.GETLK: p.LK_IN,
    p.Op.SETLK: p.LK_IN, p.Op.SETLKW: p.LK_IN, p.Op.ACCESS: p.ACCESS_IN,
    p.Op.FALLOCATE: p.FALLOCATE_IN, p.Op.LSEEK: p.LSEEK_IN, p.Op.FORGET: p.FORGET_IN,
    p.Op.BATCH_FORGET: p.BATCH_FORGET_IN, p.Op.INTERRUPT: p.INTERRUPT_IN,
}  # fmt: skip
SMALL = st.one_of(st.integers(0, 6), U64S, st.sampled_from([0o100644, 0o40755, 0o20666, 0o10644]))


@st.composite
def plausible(draw: st.DrawFn) -> bytes:
    """A message of a real opcode with its struct filled from small and edge values
    (ids and handles 0..6 exist after the LOOKUPs below), then names and data."""
    op = draw(st.sampled_from(sorted(STRUCTS)))
    fmt = STRUCTS[op]
    body = b""
    if fmt is not None:
        vals = []
        for code in fmt.format.lstrip("<").replace("x", ""):
            v = draw(SMALL)
            bits = {"Q": 64, "q": 64, "I": 32, "i": 32, "H": 16}[code]
            v &= (1 << bits) - 1
            if code in "qi" and v >= 1 << (bits - 1):
                v -= 1 << bits
            vals.append(v)
        body = fmt.pack(*vals)
    for _ in range(draw(st.integers(0, 2))):
        body += draw(NAMES) + b"\0"
    body += draw(st.binary(max_size=32))
    return request(op, body, unique=draw(st.integers(1, 50)), nodeid=draw(st.integers(0, 7)),
                   uid=draw(st.sampled_from([0, 1000])), gid=0)  # fmt: skip


@FUZZ
@given(st.lists(plausible(), max_size=40), st.lists(st.integers(1, 500), max_size=5))
def test_plausible_messages(tree: tuple[Path, Path], msgs: list[bytes], chunks: list[int]) -> None:
    root, outside = tree
    before = snapshot(outside)
    lookups = b"".join(
        request(p.Op.LOOKUP, name + b"\0", unique=2 + i, nodeid=1 if name != b"g" else 3)
        for i, name in enumerate([b"f", b"sub", b"g", b"up"])
    )
    fhs = request(p.Op.OPEN, p.OPEN_IN.pack(os.O_RDWR, 0), unique=9, nodeid=2) + request(
        p.Op.OPENDIR, p.OPEN_IN.pack(0, 0), unique=10, nodeid=3
    )
    data = request(p.Op.INIT, init_body(), unique=1) + lookups + fhs + b"".join(msgs)
    run_server(root, data, chunks)
    assert snapshot(outside) == before


@FUZZ
@given(st.lists(messages(), max_size=25), st.booleans(), st.lists(st.integers(1, 500), max_size=5))
def test_framed_messages_after_init(
    tree: tuple[Path, Path], msgs: list[bytes], with_init: bool, chunks: list[int]
) -> None:
    root, outside = tree
    before = snapshot(outside)
    data = (request(p.Op.INIT, init_body(), unique=1) if with_init else b"") + b"".join(msgs)
    run_server(root, data, chunks)
    assert snapshot(outside) == before


def test_truncated_oversized_and_short_bodies(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    init = request(p.Op.INIT, init_body(), unique=1)
    s = run_server(root, init + request(p.Op.GETATTR, bytes(16))[:50], [])
    assert s.end_reason is not None and "truncated" in s.end_reason
    s = run_server(root, init + struct.pack("<I", 1 << 30) + bytes(36), [])
    assert s.end_reason is not None and "exceeds the limit" in s.end_reason
    s = run_server(root, init + request(p.Op.GETATTR, bytes(3)), [])
    assert s.end_reason is not None and "malformed GETATTR" in s.end_reason
    s = run_server(root, init + request(p.Op.LOOKUP, b"no-terminator"), [])
    assert s.end_reason is not None and "NUL" in s.end_reason
    s = run_server(root, init + request(p.Op.GETATTR, bytes(16)), [])
    assert s.end_reason == "EOF"
