"""Transports a Session runs over: Unix sockets, Firecracker's vsock handshake,
virtio-serial (a pty pair plays the character device), AF_VSOCK."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pty
import random
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fcvm.errors import ProtocolError
from fcvm.session import Channel, Session, transport
from fcvm.session.transport import (
    _wrap_fd,
    accept_vsock,
    connect_firecracker_vsock,
    connect_unix,
    connect_vsock,
    find_virtio_port,
    host_connected,
    open_virtio_serial,
)
from tests.unit.aio import arun

pytestmark = pytest.mark.unit

VMADDR_CID_LOCAL = 1  # the vsock loopback address (not in Python 3.11's socket module)


async def exchange(host: Session, agent: Session, size: int) -> None:
    """Open a channel from the host, send `size` random bytes each way, check them."""
    ch = await host.open_channel({"kind": "check"})
    peer = await agent.accept()
    assert peer.meta == {"kind": "check"}
    out, back = random.Random(1).randbytes(size), random.Random(2).randbytes(size)

    async def send(c: Channel, data: bytes) -> None:
        await c.write(data)
        await c.write_eof()

    async def recv(c: Channel) -> bytes:
        got = bytearray()
        while chunk := await c.read():
            got += chunk
        return bytes(got)

    _, _, got_out, got_back = await asyncio.gather(
        send(ch, out), send(peer, back), recv(peer), recv(ch)
    )
    assert hashlib.sha256(got_out).digest() == hashlib.sha256(out).digest()
    assert hashlib.sha256(got_back).digest() == hashlib.sha256(back).digest()
    async def answer(op: str, msg: dict[str, Any]) -> dict[str, Any]:
        return {"echo": msg["n"]}

    agent.requests.serve(answer)
    assert (await host.requests.call("done", n=7))["echo"] == 7


# -- Unix sockets ----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_connect_unix_waits_for_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")

    async def go() -> None:
        accepted: list[bytes] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(await r.readexactly(5))
            w.close()

        async def serve_late() -> asyncio.Server:
            await asyncio.sleep(0.3)
            # First a socket file nobody listens on (ECONNREFUSED), then the server.
            stale = socket.socket(socket.AF_UNIX)
            stale.bind(path)
            await asyncio.sleep(0.2)
            stale.close()
            os.unlink(path)
            return await asyncio.start_unix_server(handle, path)

        server_task = asyncio.create_task(serve_late())
        t0 = time.monotonic()
        r, w = await connect_unix(path, timeout=5)
        assert time.monotonic() - t0 >= 0.45
        w.write(b"hello")
        await w.drain()
        assert await r.read() == b""
        assert accepted == [b"hello"]
        w.close()
        server = await server_task
        server.close()
        await server.wait_closed()

    arun(go())


@pytest.mark.timeout(10)
def test_connect_unix_times_out(tmp_path: Path) -> None:
    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"nothing\.sock"):
            await connect_unix(str(tmp_path / "nothing.sock"), timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 2

    arun(go())


# -- Firecracker vsock -----------------------------------------------------------------


class FakeFirecrackerVsock:
    """Plays Firecracker's side of a host-initiated vsock connection, as its
    documentation (docs/vsock.md) describes it: the host connects to the vsock
    device's Unix socket and sends ``CONNECT <port>\\n``; if a guest listens on that
    port Firecracker replies ``OK <host-side port>\\n`` and then relays bytes;
    if nobody listens, Firecracker closes the connection.

    Here the "guest" starts listening after `listen_after` refused attempts, and is
    an agent Session run over the relayed stream.
    """

    def __init__(self, path: str, port: int, listen_after: int, answer: bytes | None = None):
        self.path, self.port, self.listen_after, self.answer = path, port, listen_after, answer
        self.requests: list[bytes] = []
        self.agents: list[Session] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self.handle, self.path)

    async def stop(self) -> None:
        for agent in self.agents:
            await agent.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.requests.append(line)
        words = line.split()
        listening = len(self.requests) > self.listen_after
        if len(words) != 2 or words[0] != b"CONNECT" or int(words[1]) != self.port or not listening:
            writer.close()
            return
        if self.answer is not None:
            writer.write(self.answer)
            writer.close()
            return
        # The OK line and the guest agent's first bytes arrive together.
        agent = Session(reader, writer, role="agent")
        self.agents.append(agent)
        writer.write(b"OK 1073741824\n")
        await agent.start(5)


@pytest.mark.timeout(15)
def test_firecracker_vsock_retries_until_guest_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "v.sock")

    async def go() -> None:
        fc = FakeFirecrackerVsock(path, 52, listen_after=3)

        async def start_late() -> None:
            await asyncio.sleep(0.2)  # the VMM has not made its socket yet
            await fc.start()

        starter = asyncio.create_task(start_late())
        reader, writer = await connect_firecracker_vsock(path, 52, timeout=10)
        assert fc.requests == [b"CONNECT 52\n"] * 4
        host = Session(reader, writer, role="host")
        assert (await host.start(5))["role"] == "agent"
        assert len(fc.agents) == 1
        await exchange(host, fc.agents[0], 300_000)
        await host.close()
        await starter
        await fc.stop()

    arun(go())


@pytest.mark.timeout(10)
def test_firecracker_vsock_times_out_when_nobody_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "v.sock")

    async def go() -> None:
        fc = FakeFirecrackerVsock(path, 52, listen_after=10**9)
        await fc.start()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not reachable"):
            await connect_firecracker_vsock(path, 52, timeout=0.5)
        assert 0.45 <= time.monotonic() - t0 < 3
        assert len(fc.requests) >= 2
        assert set(fc.requests) == {b"CONNECT 52\n"}
        await fc.stop()

    arun(go())


@pytest.mark.timeout(10)
@pytest.mark.parametrize("answer", [b"NOPE\n", b"OK x\n", b"HTTP/1.1 400 Bad Request\r\n"])
def test_firecracker_vsock_bad_answer(tmp_path: Path, answer: bytes) -> None:
    path = str(tmp_path / "v.sock")

    async def go() -> None:
        fc = FakeFirecrackerVsock(path, 7, listen_after=0, answer=answer)
        await fc.start()
        with pytest.raises(ProtocolError, match="bad vsock handshake"):
            await connect_firecracker_vsock(path, 7, timeout=2)
        await fc.stop()

    arun(go())


# -- virtio-serial -----------------------------------------------------------------------


def fake_virtio_ports(tmp_path: Path, ports: dict[str, str]) -> tuple[Path, Path]:
    """A sysfs tree /sys/class/virtio-ports/<dev>/name and an empty /dev."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    for device, name in ports.items():
        (sysfs / device).mkdir(parents=True)
        (sysfs / device / "name").write_text(name + "\n")
    return sysfs, dev


@pytest.mark.timeout(20)
def test_virtio_serial_over_a_pty(tmp_path: Path) -> None:
    """A pty pair stands in for the port: the slave is the guest's character
    device, the master the host's end of the chardev."""
    sysfs, dev = fake_virtio_ports(
        tmp_path, {"vport1p1": "org.qemu.guest_agent", "vport1p2": "fcvm.0"}
    )
    master, slave = pty.openpty()
    (dev / "vport1p2").symlink_to(os.ttyname(slave))
    os.close(slave)
    assert find_virtio_port("fcvm.0", str(sysfs)) == "vport1p2"
    assert find_virtio_port("missing", str(sysfs)) is None

    async def go() -> None:
        guest_task = asyncio.create_task(
            open_virtio_serial("fcvm.0", 5, sysfs_root=str(sysfs), dev_root=str(dev))
        )
        hr, hw = await _wrap_fd(master)
        gr, gw = await guest_task
        assert os.readlink(dev / "virtio-ports" / "fcvm.0") == "../vport1p2"
        host = Session(hr, hw, role="host")
        agent = Session(gr, gw, role="agent")
        await asyncio.gather(host.start(5), agent.start(5))
        await exchange(host, agent, 1_000_000)
        await agent.close()
        await asyncio.wait_for(host.wait_closed(), 5)
        await host.close()

    arun(go())


@pytest.mark.timeout(10)
def test_virtio_serial_waits_for_the_port(tmp_path: Path) -> None:
    sysfs, dev = fake_virtio_ports(tmp_path, {})
    master, slave = pty.openpty()
    slave_path = os.ttyname(slave)
    os.close(slave)
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / "fcvm.0").symlink_to("../stale")  # wrong link: replaced

    async def go() -> None:
        async def hotplug() -> None:
            await asyncio.sleep(0.2)
            (sysfs / "vport0p1").mkdir(parents=True)
            (sysfs / "vport0p1" / "name").write_text("fcvm.0\n")
            await asyncio.sleep(0.2)  # the device node comes a little later
            (dev / "vport0p1").symlink_to(slave_path)

        plug = asyncio.create_task(hotplug())
        t0 = time.monotonic()
        r, w = await open_virtio_serial("fcvm.0", 5, sysfs_root=str(sysfs), dev_root=str(dev))
        assert time.monotonic() - t0 >= 0.35
        await plug
        assert os.readlink(dev / "virtio-ports" / "fcvm.0") == "../vport0p1"
        w.write(b"ping\n")
        await w.drain()
        assert await asyncio.to_thread(os.read, master, 100) == b"ping\n"
        os.write(master, b"pong")
        assert await r.readexactly(4) == b"pong"
        w.close()
        await w.wait_closed()
        os.close(master)

    arun(go())


@pytest.mark.timeout(10)
def test_virtio_serial_times_out(tmp_path: Path) -> None:
    sysfs, dev = fake_virtio_ports(tmp_path, {"vport0p1": "other"})

    async def go() -> None:
        with pytest.raises(TimeoutError, match=r"no port named 'fcvm\.0'"):
            await open_virtio_serial("fcvm.0", 0.3, sysfs_root=str(sysfs), dev_root=str(dev))

    arun(go())


def test_host_connected_follows_pollhup() -> None:
    """A port with no host behind it reports POLLHUP, like a pty whose master is gone."""
    master, slave = pty.openpty()
    try:
        assert host_connected(slave)
        os.close(master)
        assert not host_connected(slave)
    finally:
        os.close(slave)


@pytest.mark.timeout(10)
def test_virtio_serial_waits_for_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port exists but no host is connected yet: open_virtio_serial waits
    (a session started now would read EOF at once), then proceeds or times out."""
    sysfs, dev = fake_virtio_ports(tmp_path, {"vport0p1": "fcvm.0"})
    master, slave = pty.openpty()
    (dev / "vport0p1").symlink_to(os.ttyname(slave))
    os.close(slave)
    connected_at = time.monotonic() + 0.3
    monkeypatch.setattr(transport, "host_connected", lambda fd: time.monotonic() >= connected_at)

    async def go() -> None:
        t0 = time.monotonic()
        _r, w = await open_virtio_serial("fcvm.0", 5, sysfs_root=str(sysfs), dev_root=str(dev))
        assert time.monotonic() >= connected_at
        assert time.monotonic() - t0 < 2
        w.close()
        await w.wait_closed()
        monkeypatch.setattr(transport, "host_connected", lambda fd: False)
        with pytest.raises(TimeoutError, match="no host connected"):
            await open_virtio_serial("fcvm.0", 0.2, sysfs_root=str(sysfs), dev_root=str(dev))
        os.close(master)

    arun(go())


# -- AF_VSOCK --------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_accept_vsock_over_loopback() -> None:
    """Needs the kernel's vsock loopback transport (CID 1); skipped without it."""
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK")
    port = 40000 + os.getpid() % 20000

    async def go() -> None:
        try:
            server = asyncio.create_task(accept_vsock(port))
        except OSError as e:  # pragma: no cover
            pytest.skip(f"AF_VSOCK unusable: {e}")
        await asyncio.sleep(0.05)
        if server.done():
            exc = server.exception()
            pytest.skip(f"cannot listen on AF_VSOCK: {exc!r}")
        try:
            hr, hw = await connect_vsock(VMADDR_CID_LOCAL, port, timeout=1.0)
        except (TimeoutError, OSError) as e:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            pytest.skip(f"no vsock loopback transport here: {e}")
        gr, gw = await server
        host, agent = Session(hr, hw, role="host"), Session(gr, gw, role="agent")
        await asyncio.gather(host.start(5), agent.start(5))
        await exchange(host, agent, 200_000)
        await host.close()
        await agent.close()

    arun(go())
