"""A Machine's --map servers (machine/volumes.py) and where each backend puts their
streams: QEMU gives every VM the same MAP_CHANNELS virtio-serial ports; Firecracker's
guest reaches `<vsock uds>_<1100 + i>`."""

from __future__ import annotations

import resource
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from fcvm.agent.protocol import MAP_PORT_NAME, MAP_VSOCK_PORT_BASE
from fcvm.machine.volumes import FD_RESERVE, VolumeServers
from fcvm.vmm.base import MAP_CHANNELS, Drive, SnapshotFiles, VmConfig
from fcvm.vmm.endpoints import UnixConnector, UnixListener
from fcvm.vmm.firecracker import FirecrackerVmm
from fcvm.vmm.qemu import QemuVmm
from fcvm.volumes import protocol as p
from fcvm.volumes.spec import VolumeMap
from tests.unit.volumes_wire import init_body, request

pytestmark = pytest.mark.unit


def config(tmp_path: Path) -> VmConfig:
    return VmConfig(vm_id="t", workdir=tmp_path, kernel=tmp_path / "k", initrd=tmp_path / "i",
                    vcpus=1, mem_mib=256,
                    drives=(Drive("root", tmp_path / "r", is_root=True),))  # fmt: skip


def test_every_qemu_vm_has_the_same_map_ports(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("fcvm.vmm.qemu.qemu_binary", lambda: "qemu-system-x86_64")
    vmm = QemuVmm(config(tmp_path))
    argv = vmm.argv()
    ports = [a for a in argv if a.startswith("virtserialport,chardev=map")]
    assert ports == [f"virtserialport,chardev=map{i},name={MAP_PORT_NAME.format(i)}"
                     for i in range(MAP_CHANNELS)]  # fmt: skip
    # A restore has the same ports (a snapshot records the device layout)
    restore_argv = vmm.argv(restore=SnapshotFiles(tmp_path / "mem", tmp_path / "state"))
    assert "-incoming" in restore_argv
    assert [a for a in restore_argv if "map" in a] == [a for a in argv if "map" in a]
    endpoint = vmm.map_endpoint(3)
    assert isinstance(endpoint, UnixConnector) and endpoint.path == tmp_path / "map-3.sock"
    assert f"path={endpoint.path}" in " ".join(argv)


def test_firecracker_map_streams_are_vsock_ports_to_the_host(tmp_path: Path) -> None:
    vmm = FirecrackerVmm(config(tmp_path), binary=Path("/bin/true"))
    endpoint = vmm.map_endpoint(2)
    try:
        assert isinstance(endpoint, UnixListener)
        assert endpoint.path == Path(f"{vmm.vsock_path}_{MAP_VSOCK_PORT_BASE + 2}")
        assert endpoint.path.exists()
    finally:
        endpoint.close()


class ListenerVmm:
    """The map streams of a fake VMM: sockets in tmp_path the test connects to."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path

    def map_endpoint(self, index: int) -> UnixListener:
        return UnixListener(self.dir / f"map-{index}")


def _init(sock: socket.socket) -> tuple[int, int]:
    sock.sendall(request(p.Op.INIT, init_body(), unique=7))
    sock.settimeout(5)
    length, error, unique = p.OUT_HEADER.unpack(sock.recv(p.OUT_HEADER_SIZE))
    sock.recv(length - p.OUT_HEADER_SIZE)
    return error, unique


def test_each_map_is_served_on_its_own_stream_until_stop(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    servers = VolumeServers((VolumeMap(dirs[0], "/a"), VolumeMap(dirs[1], "/b", True)),
                            ListenerVmm(tmp_path))  # type: ignore[arg-type]
    servers.start()
    try:
        with socket.socket(socket.AF_UNIX) as guest:
            guest.connect(str(tmp_path / "map-1"))
            assert _init(guest) == (0, 7)
            assert servers.servers[1].read_only and servers.servers[1].negotiated
            assert servers.servers[0].negotiated is None  # map 0's guest never came
        deadline = time.monotonic() + 5
        while not servers.ended() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(m.guest, why) for m, why in servers.ended()] == [("/b", "EOF")]
    finally:
        t0 = time.monotonic()
        servers.stop()  # map 0 still waits for its guest: stop ends that too
        assert time.monotonic() - t0 < 5
    assert not any(t.is_alive() for t in servers._threads)
    assert not (tmp_path / "map-0").exists()


def test_a_malformed_stream_ends_only_its_map(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    servers = VolumeServers((VolumeMap(tmp_path / "a", "/a"), VolumeMap(tmp_path / "b", "/b")),
                            ListenerVmm(tmp_path))  # type: ignore[arg-type]
    servers.start()
    try:
        with socket.socket(socket.AF_UNIX) as bad, socket.socket(socket.AF_UNIX) as good:
            bad.connect(str(tmp_path / "map-0"))
            good.connect(str(tmp_path / "map-1"))
            bad.sendall(struct.pack("<I", 3) + bytes(60))  # a length no message has
            deadline = time.monotonic() + 5
            while not servers.ended() and time.monotonic() < deadline:
                time.sleep(0.01)
            [(m, why)] = servers.ended()
            assert m.guest == "/a" and why.startswith("malformed")
            assert _init(good) == (0, 7)
    finally:
        servers.stop()


def test_descriptor_budget_is_shared_between_maps(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("fcvm.machine.volumes.raise_fd_limit", lambda: 4096)
    maps = tuple(VolumeMap(tmp_path, f"/m{i}") for i in range(4))
    servers = VolumeServers(maps, ListenerVmm(tmp_path))  # type: ignore[arg-type]
    try:
        total = sum(s.max_nodes + s.max_handles for s in servers.servers)
        assert total <= 4096 - FD_RESERVE
        assert all(s.max_handles >= 16 and s.max_nodes >= 64 for s in servers.servers)
    finally:
        servers.stop()


def test_the_soft_fd_limit_is_raised_to_the_hard_one() -> None:
    from fcvm.machine.volumes import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_fd_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("env", "want"), [
    ({}, False),
    ({"FCVM_WRITEBACK_CACHE": "1"}, True),
    ({"FCVM_WRITEBACK_CACHE": "0"}, False),
    ({"FCVM_WRITEBACK_CACHE": "1", "FCVM_NO_WRITEBACK_CACHE": "1"}, False),
    ({"FCVM_NO_WRITEBACK_CACHE": "0", "FCVM_WRITEBACK_CACHE": "yes"}, True),
])  # fmt: skip
def test_the_writeback_cache_is_opt_in(tmp_path: Path, monkeypatch: Any, env: dict[str, str],
                                       want: bool) -> None:  # fmt: skip
    """A VM's maps run without the writeback cache unless FCVM_WRITEBACK_CACHE asks for
    it; FCVM_NO_WRITEBACK_CACHE=1 keeps it off. Read-only maps never have it."""
    monkeypatch.setattr("fcvm.vmm.qemu.qemu_binary", lambda: "qemu-system-x86_64")
    for name in ("FCVM_WRITEBACK_CACHE", "FCVM_NO_WRITEBACK_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    maps = (VolumeMap(tmp_path, "/a"), VolumeMap(tmp_path, "/b", read_only=True))
    servers = VolumeServers(maps, QemuVmm(config(tmp_path)))
    assert [s.writeback for s in servers.servers] == [want, False]
