"""The host ends of the VM's extra byte streams (one per --map volume).

Each backend carries a guest stream to the host its own way: QEMU serves a
virtio-serial port's chardev as a Unix socket the host connects to; Firecracker, when
the guest connects to a vsock port P, connects to the Unix socket `<vsock uds>_P`,
which the host must be listening on. Both look the same to the caller: `open()`
blocks until the stream is there (and returns a connected socket), `close()` makes a
pending open() give up, from any thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from fcvm.errors import VmmUnavailable

_RETRY_SECONDS = 0.02


class Closed(VmmUnavailable):
    """open() was interrupted by close()."""


class UnixConnector:
    """Connects to a Unix socket the VMM serves (QEMU's chardev), retrying until it
    exists: QEMU makes it while it starts."""

    open_timeout: float | None = 30.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._closed = threading.Event()

    def open(self, timeout: float | None) -> socket.socket:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if self._closed.is_set():
                    raise Closed(f"{self.path}: closed") from None
                if time.monotonic() > deadline:
                    raise VmmUnavailable(f"cannot connect to {self.path}: {exc}") from None
            if self._closed.wait(_RETRY_SECONDS):
                raise Closed(f"{self.path}: closed")

    def close(self) -> None:
        self._closed.set()


class UnixListener:
    """Listens on a Unix socket from construction on (before the guest may connect);
    open() accepts the one connection. The guest connects when it needs the stream,
    which may be long after boot: by default open() waits until close()."""

    open_timeout: float | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._closed = threading.Event()

    def open(self, timeout: float | None) -> socket.socket:
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise VmmUnavailable(f"nothing connected to {self.path} in {timeout}s") from None
        except OSError as exc:
            if self._closed.is_set():
                raise Closed(f"{self.path}: closed") from None
            raise VmmUnavailable(f"{self.path}: {exc}") from None
        conn.settimeout(None)
        return conn

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


StreamEndpoint = UnixConnector | UnixListener
