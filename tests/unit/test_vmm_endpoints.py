"""The host ends of the --map streams: QEMU's (connect to the chardev socket once QEMU
has made it) and Firecracker's (listen before the guest connects); close() ends a
pending open() from another thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from fcvm.errors import VmmUnavailable
from fcvm.vmm.endpoints import Closed, UnixConnector, UnixListener

pytestmark = pytest.mark.unit


def _serve_later(path: Path, delay: float) -> threading.Thread:
    def serve() -> None:
        time.sleep(delay)
        with socket.socket(socket.AF_UNIX) as srv:
            srv.bind(str(path))
            srv.listen(1)
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"hi")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_connector_waits_for_the_socket_to_appear(tmp_path: Path) -> None:
    path = tmp_path / "map-0.sock"
    t = _serve_later(path, 0.2)
    with UnixConnector(path).open(5.0) as sock:
        assert sock.recv(2) == b"hi"
    t.join(5)


def test_connector_gives_up_at_its_timeout(tmp_path: Path) -> None:
    with pytest.raises(VmmUnavailable, match="cannot connect"):
        UnixConnector(tmp_path / "never.sock").open(0.1)


def test_connector_close_interrupts_open(tmp_path: Path) -> None:
    endpoint = UnixConnector(tmp_path / "never.sock")
    threading.Timer(0.1, endpoint.close).start()
    t0 = time.monotonic()
    with pytest.raises(Closed):
        endpoint.open(None)
    assert time.monotonic() - t0 < 5


def test_listener_accepts_what_connects_to_it(tmp_path: Path) -> None:
    path = tmp_path / "v.sock_1100"
    endpoint = UnixListener(path)
    assert path.exists()  # listening from construction: a guest may connect any time
    with socket.socket(socket.AF_UNIX) as guest:
        guest.connect(str(path))
        with endpoint.open(5.0) as sock:
            guest.sendall(b"x")
            assert sock.recv(1) == b"x"
    endpoint.close()
    assert not path.exists()


def test_listener_close_interrupts_accept(tmp_path: Path) -> None:
    endpoint = UnixListener(tmp_path / "v.sock_1101")
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            endpoint.open(None)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    endpoint.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], Closed)


def test_listener_times_out(tmp_path: Path) -> None:
    endpoint = UnixListener(tmp_path / "v.sock_1102")
    try:
        with pytest.raises(VmmUnavailable, match="nothing connected"):
            endpoint.open(0.1)
    finally:
        endpoint.close()
