"""The host side of a Machine's --map volumes: one VolumeServer thread per map.

Map i travels on the VM's extra stream i (Vmm.map_endpoint: a virtio-serial port's
socket under QEMU, a vsock port's socket under Firecracker). Each thread waits for
its stream, then serves the host directory on it until the stream ends, the guest
breaks the protocol (that map ends, logged with the reason; the VM and the other maps
go on), or the Machine stops. Nothing is mounted on the host and nothing runs
privileged: the servers are threads of the fcvm process that owns the VM, so they
die with it (kill -9 included) and leave nothing behind.
"""

from __future__ import annotations

import contextlib
import resource
import threading
from typing import TYPE_CHECKING

from fcvm import log
from fcvm.vmm.base import Vmm
from fcvm.vmm.endpoints import Closed, StreamEndpoint
from fcvm.volumes.spec import VolumeMap

if TYPE_CHECKING:
    from fcvm.volumes.server import VolumeServer

logger = log.get("machine.volumes")

FD_RESERVE = 512  # descriptors left for the rest of fcvm
JOIN_TIMEOUT = 5.0


def raise_fd_limit() -> int:
    """Each node the guest holds is an open O_PATH descriptor on the host: lift the soft
    RLIMIT_NOFILE to the hard one. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class VolumeServers:
    """Serving a Machine's maps; start() once the VMM exists, stop() undoes it."""

    def __init__(self, maps: tuple[VolumeMap, ...], vmm: Vmm) -> None:
        from fcvm.volumes.server import DEFAULT_MAX_HANDLES, DEFAULT_MAX_NODES, writeback_from_env

        self.maps = maps
        soft = raise_fd_limit()
        # The descriptor budget is shared between the maps (servers each check only
        # against the whole limit): a guest filling one map cannot starve the others.
        share = max(96, (soft - FD_RESERVE) // max(1, len(maps)))
        handles = max(16, min(DEFAULT_MAX_HANDLES, share // 8))
        nodes = max(64, min(DEFAULT_MAX_NODES, share - handles))
        writeback = writeback_from_env()
        self.servers = [self._server(m, writeback, nodes, handles) for m in maps]
        self.endpoints: list[StreamEndpoint] = [vmm.map_endpoint(i) for i in range(len(maps))]
        self._threads: list[threading.Thread] = []

    @staticmethod
    def _server(m: VolumeMap, writeback: bool, nodes: int, handles: int) -> VolumeServer:
        from fcvm.volumes.server import VolumeServer

        return VolumeServer(m.host, read_only=m.read_only, writeback=writeback,
                            max_nodes=nodes, max_handles=handles)  # fmt: skip

    def start(self) -> None:
        for i, (m, server, endpoint) in enumerate(zip(self.maps, self.servers, self.endpoints,
                                                      strict=True)):  # fmt: skip
            t = threading.Thread(target=self._serve, args=(m, server, endpoint),
                                 name=f"fcvm-map-{i}", daemon=True)  # fmt: skip
            t.start()
            self._threads.append(t)

    def _serve(self, m: VolumeMap, server: VolumeServer, endpoint: StreamEndpoint) -> None:
        try:
            sock = endpoint.open(endpoint.open_timeout)
        except Closed:
            return
        except Exception as exc:
            logger.warning("map %s:%s: no stream from the guest: %s", m.host, m.guest, exc)
            return
        with sock:
            server.serve(sock)

    def ended(self) -> list[tuple[VolumeMap, str]]:
        """Maps whose serving has ended, with why (EOF, a protocol violation, ...)."""
        return [(m, s.end_reason) for m, s in zip(self.maps, self.servers, strict=True)
                if s.end_reason is not None]  # fmt: skip

    def stop(self) -> None:
        for server, endpoint in zip(self.servers, self.endpoints, strict=True):
            server.stop()
            endpoint.close()
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                logger.warning("%s did not end within %.0fs", t.name, JOIN_TIMEOUT)
