"""A raw FUSE client for tests: builds kernel-style requests and reads replies, to talk
to a VolumeServer over a socketpair with no kernel in between (forged ids, malformed
messages, the server's own read-only checks)."""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from fcvm.volumes import protocol as p
from fcvm.volumes.server import VolumeServer

INIT_FLAGS = (1 << 31) - 1  # everything below INIT_RESERVED


def request(opcode: int, body: bytes = b"", *, unique: int = 1, nodeid: int = 1,
            uid: int = 0, gid: int = 0, pid: int = 1) -> bytes:  # fmt: skip
    return p.IN_HEADER.pack(p.IN_HEADER_SIZE + len(body), opcode, unique, nodeid, uid, gid,
                            pid, 0, 0) + body  # fmt: skip


def init_body(minor: int = 38, flags: int = INIT_FLAGS) -> bytes:
    return p.INIT_IN_COMPAT.pack(7, minor, 131072, flags) + bytes(48)


@dataclass
class Reply:
    error: int
    unique: int
    body: bytes


class RawClient:
    """Runs `server.serve` in a thread on one end of a socketpair."""

    def __init__(self, server: VolumeServer) -> None:
        self.server = server
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._theirs = theirs
        self.thread = threading.Thread(target=server.serve, args=(theirs,), daemon=True)
        self.thread.start()
        self.unique = 100

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_reply(self, timeout: float = 5.0) -> Reply:
        self.sock.settimeout(timeout)
        head = self._exact(p.OUT_HEADER_SIZE)
        length, error, unique = p.OUT_HEADER.unpack(head)
        return Reply(error, unique, self._exact(length - p.OUT_HEADER_SIZE))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the stream")
            buf += chunk
        return buf

    def call(self, opcode: int, body: bytes = b"", **kw: int) -> Reply:
        self.unique += 1
        self.send_raw(request(opcode, body, unique=self.unique, **kw))
        r = self.recv_reply()
        assert r.unique == self.unique, (r, self.unique)
        return r

    def init(self) -> Reply:
        r = self.call(p.Op.INIT, init_body())
        assert r.error == 0, r
        return r

    def lookup(self, parent: int, name: bytes) -> tuple[int, Reply]:
        r = self.call(p.Op.LOOKUP, name + b"\0", nodeid=parent)
        nodeid = struct.unpack_from("<Q", r.body)[0] if r.error == 0 else 0
        return nodeid, r

    def close(self, timeout: float = 10.0) -> None:
        """EOF to the server; it must end by itself."""
        self.sock.close()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "serve() did not return after EOF"
        self._theirs.close()


def raw_server(root: Path, **kw: bool) -> RawClient:
    return RawClient(VolumeServer(root, **kw))
