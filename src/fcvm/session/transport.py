"""Byte streams a Session runs over (stdlib only: the guest imports this too).

Host side:  connect_unix, connect_firecracker_vsock, connect_vsock (QEMU vhost-vsock).
Guest side: accept_vsock, open_virtio_serial.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import time
import tty

from fcvm.errors import ProtocolError

log = logging.getLogger("fcvm.session")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

_RETRY_FIRST = 0.01
_RETRY_MAX = 0.2


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


async def _pause(deadline: float, delay: float) -> float:
    """Sleep before the next attempt (never past the deadline); the next delay."""
    await asyncio.sleep(max(0.0, min(delay, _remaining(deadline))))
    return min(delay * 2, _RETRY_MAX)


async def connect_unix(path: str, timeout: float) -> Streams:
    """Connect to a Unix stream socket, retrying while it does not exist yet or
    refuses connections (the VMM may still be creating it). TimeoutError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = _RETRY_FIRST
    while True:
        try:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(path), max(0.0, _remaining(deadline))
            )
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if _remaining(deadline) <= 0:
                raise TimeoutError(f"cannot connect to {path} within {timeout}s: {e}") from e
        except TimeoutError:
            raise TimeoutError(f"cannot connect to {path} within {timeout}s") from None
        delay = await _pause(deadline, delay)


async def _close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, RuntimeError):
        await writer.wait_closed()


async def connect_firecracker_vsock(uds_path: str, port: int, timeout: float) -> Streams:
    """A host-initiated connection to guest vsock `port` through Firecracker.

    Firecracker's documented handshake: connect to the vsock device's Unix socket,
    send ``CONNECT <port>\\n``; Firecracker answers ``OK <host port>\\n`` once the
    guest accepted, or closes the connection if nobody listens on that port yet.
    We retry that (and a missing socket) until `timeout`. Bytes the guest sends
    right after accepting stay buffered in the returned reader.
    """
    if not 0 < port <= 0xFFFFFFFF:
        raise ValueError(f"vsock port out of range: {port}")
    deadline = time.monotonic() + timeout
    delay = _RETRY_FIRST
    attempts = 0
    last = ""
    while True:
        if attempts and _remaining(deadline) <= 0:
            raise TimeoutError(
                f"guest vsock port {port} via {uds_path} not reachable within {timeout}s "
                f"({attempts} attempts; last: {last})"
            )
        reader, writer = await connect_unix(uds_path, max(0.0, _remaining(deadline)))
        attempts += 1
        last = "connection closed (guest not listening yet?)"
        try:
            writer.write(f"CONNECT {port}\n".encode("ascii"))
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), max(0.0, _remaining(deadline)))
        except TimeoutError:
            await _close_quietly(writer)
            raise TimeoutError(
                f"no answer to CONNECT {port} on {uds_path} within {timeout}s"
            ) from None
        except (ConnectionError, OSError) as e:
            line, last = b"", repr(e)
        except ValueError:  # readline() over its limit: not Firecracker talking
            await _close_quietly(writer)
            raise ProtocolError(f"bad vsock handshake answer from {uds_path}") from None
        if line.endswith(b"\n"):
            words = line.split()
            if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
                await _close_quietly(writer)
                raise ProtocolError(f"bad vsock handshake answer {line!r}")
            log.debug("vsock %s port %d connected after %d attempts", uds_path, port, attempts)
            return reader, writer
        await _close_quietly(writer)
        if line:  # a partial line, then the connection closed
            last = f"connection closed after {line!r}"
        delay = await _pause(deadline, delay)


async def connect_vsock(cid: int, port: int, timeout: float) -> Streams:
    """AF_VSOCK connection to (cid, port), e.g. a QEMU vhost-vsock guest; retried
    while the guest does not listen yet. TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = _RETRY_FIRST
    loop = asyncio.get_running_loop()
    retry = {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ENODEV,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
    }
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                loop.sock_connect(sock, (cid, port)), max(0.0, _remaining(deadline))
            )
        except TimeoutError:
            sock.close()
            raise TimeoutError(f"vsock {cid}:{port} not reachable within {timeout}s") from None
        except OSError as e:
            sock.close()
            if e.errno not in retry:
                raise
            if _remaining(deadline) <= 0:
                raise TimeoutError(
                    f"vsock {cid}:{port} not reachable within {timeout}s: {e}"
                ) from e
            delay = await _pause(deadline, delay)
            continue
        return await asyncio.open_connection(sock=sock)


async def accept_vsock(port: int, *, cid: int = socket.VMADDR_CID_ANY) -> Streams:
    """Guest side: listen on AF_VSOCK (cid, port) and accept one connection."""
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind((cid, port))
        listener.listen(1)
        conn, addr = await loop.sock_accept(listener)
    finally:
        listener.close()
    log.debug("vsock connection on port %d from %s", port, addr)
    return await asyncio.open_connection(sock=conn)


# -- virtio-serial -------------------------------------------------------------------


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    """Flow control for a write pipe, plus the close waiter StreamWriter.wait_closed uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._close_waiter: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._close_waiter.done():
            self._close_waiter.set_result(None)

    def _get_close_waiter(self, stream: object) -> asyncio.Future[None]:
        return self._close_waiter


class _PipeWriter(asyncio.StreamWriter):
    """A StreamWriter whose close() also closes the read side of the same device."""

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        protocol: asyncio.BaseProtocol,
        reader: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
        read_transport: asyncio.ReadTransport,
    ) -> None:
        super().__init__(transport, protocol, reader, loop)
        self._read_transport = read_transport

    def close(self) -> None:
        self._read_transport.close()
        super().close()

    def can_write_eof(self) -> bool:
        return False


def find_virtio_port(name: str, sysfs_root: str = "/sys/class/virtio-ports") -> str | None:
    """The port's device name (e.g. ``vport1p1``) whose sysfs ``name`` is `name`."""
    try:
        entries = sorted(os.listdir(sysfs_root))
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(sysfs_root, entry, "name"), encoding="utf-8") as f:
                port_name = f.read().strip()
        except OSError:
            continue
        if port_name == name:
            return entry
    return None


def _link_port(name: str, device: str, dev_root: str) -> None:
    """/dev/virtio-ports/NAME -> ../DEVICE, as udev would make it."""
    links = os.path.join(dev_root, "virtio-ports")
    os.makedirs(links, exist_ok=True)
    link = os.path.join(links, name)
    target = f"../{device}"
    if os.path.lexists(link):
        if os.readlink(link) == target:
            return
        os.unlink(link)
    with contextlib.suppress(FileExistsError):  # someone else just made it
        os.symlink(target, link)


async def open_virtio_serial(
    name: str,
    timeout: float,
    *,
    sysfs_root: str = "/sys/class/virtio-ports",
    dev_root: str = "/dev",
    wait_for_host: bool = True,
) -> Streams:
    """Guest side: open the virtio-serial port called `name` as a stream pair.

    Waits (until `timeout`) for the port to show up under `sysfs_root` and its
    device node under `dev_root`, makes the ``virtio-ports/NAME`` link (there is
    no udev in the guest), opens the character device non-blocking and wraps it.
    A port has one opener: EBUSY is retried too. If the device is a terminal it is
    switched to raw mode so bytes pass unchanged.

    While no host side is connected to the port (QEMU: no client on the chardev
    yet), the kernel reports POLLHUP and read() returns 0, which a Session would
    take for the end of the stream; with `wait_for_host` (the default) we wait,
    within the same timeout, until the host is there.
    """
    deadline = time.monotonic() + timeout
    delay = _RETRY_FIRST
    while True:
        device = find_virtio_port(name, sysfs_root)
        if device is not None:
            path = os.path.join(dev_root, device)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except (FileNotFoundError, BlockingIOError) as e:
                why = f"{path}: {e}"
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                why = f"{path}: busy (a port has one opener)"
            else:
                break
        else:
            why = f"no port named {name!r} under {sysfs_root}"
        if _remaining(deadline) <= 0:
            raise TimeoutError(
                f"virtio-serial port {name!r} not available within {timeout}s: {why}"
            )
        delay = await _pause(deadline, delay)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISCHR(mode):
            raise OSError(errno.ENODEV, f"{path} is not a character device")
        if os.isatty(fd):
            tty.setraw(fd)
        _link_port(name, device, dev_root)
        if wait_for_host:
            await _wait_host_connected(fd, path, deadline, timeout)
    except BaseException:
        os.close(fd)
        raise
    return await _wrap_fd(fd)


def host_connected(fd: int) -> bool:
    """False while the other side of a port (or terminal) is hung up: POLLHUP."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    return not any(events & select.POLLHUP for _fd, events in poller.poll(0))


async def _wait_host_connected(fd: int, path: str, deadline: float, timeout: float) -> None:
    delay = _RETRY_FIRST
    while not host_connected(fd):
        if _remaining(deadline) <= 0:
            raise TimeoutError(f"{path}: no host connected to the port within {timeout}s")
        delay = await _pause(deadline, delay)


async def _wrap_fd(fd: int) -> Streams:
    """Stream reader/writer over one read-write fd (takes ownership of fd)."""
    loop = asyncio.get_running_loop()
    wfd = os.dup(fd)
    rfile = os.fdopen(fd, "rb", buffering=0)
    try:
        wfile = os.fdopen(wfd, "wb", buffering=0)
    except BaseException:
        os.close(wfd)
        raise
    reader = asyncio.StreamReader(loop=loop)
    try:
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), rfile
        )
    except BaseException:
        rfile.close()
        wfile.close()
        raise
    try:
        write_transport, write_protocol = await loop.connect_write_pipe(
            lambda: _WriteProtocol(loop), wfile
        )
    except BaseException:
        read_transport.close()
        wfile.close()
        raise
    writer = _PipeWriter(write_transport, write_protocol, reader, loop, read_transport)
    return reader, writer
