"""--map volumes in the guest: one fcvm-fuse-relay per volume, mounting it inside the
container.

For each MapMount the agent opens the volume's stream to the host (the virtio-serial
port MAP_PORT_NAME.format(channel) under QEMU, a vsock connection to the host on port
MAP_VSOCK_PORT_BASE + channel under Firecracker) and starts the relay with it:

    fcvm-fuse-relay [--ro] --mntns /proc/PID/ns/mnt GUEST STREAM_FD

The relay opens /dev/fuse here (a container need not have it), enters the container's
mount namespace, creates GUEST and mounts the volume there, then says "R". It stays
in the agent's PID namespace, out of the container's reach (it cannot be killed or
traced from inside), and ends when the stream does or when the container's mount
namespace goes away with its last process.

Mounts happen before the gate execs the user's process, so the process finds them
from its first instruction; attaching to a container that already runs (a clone)
mounts them then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import subprocess
import threading
import time
from typing import IO

from fcvm.agent import procs
from fcvm.agent import protocol as p
from fcvm.agent.image import ProcError
from fcvm.agent.spec import MapMount

log = logging.getLogger("fcvm.agent")

HOST_CID = 2
READY_TIMEOUT = 30.0  # stream open + relay mount
_POLL_SECONDS = 0.02


class Maps:
    """The volumes mounted in this VM's container, by channel."""

    def __init__(self, reaper: procs.Reaper, transport: str) -> None:
        self.reaper = reaper
        self.transport = transport  # "serial" (QEMU) or "vsock" (Firecracker)
        self._relays: dict[int, tuple[MapMount, asyncio.Future[int]]] = {}

    async def mount(self, pid: int, maps: tuple[MapMount, ...]) -> None:
        """Mount every map not mounted yet in the mount namespace of process `pid`;
        ProcError (125) naming the map if one cannot be."""
        for m in maps:
            mounted = self._relays.get(m.channel)
            if mounted is not None and not mounted[1].done():
                if mounted[0] != m:
                    raise ProcError(f"--map {m.guest}: channel {m.channel} is in use", 125)
                continue
            await self._mount_one(pid, m)

    async def _mount_one(self, pid: int, m: MapMount) -> None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            fd = await loop.run_in_executor(None, self._open_stream, m.channel, deadline)
        except OSError as exc:
            raise ProcError(f"--map {m.guest}: no stream to the host: {exc}", 125) from None
        argv = [p.RELAY_BINARY, *(["--ro"] if m.read_only else []),
                "--mntns", f"/proc/{pid}/ns/mnt", m.guest, str(fd)]  # fmt: skip
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(fd,), start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(fd)  # the relay has it
        done = self.reaper.watch(proc)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            ready = await asyncio.wait_for(
                loop.run_in_executor(None, proc.stdout.read, 1), deadline - time.monotonic()
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            ready = b""
        if ready != b"R":
            await done
            why = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise ProcError(f"--map {m.guest}: {why[-1] if why else 'the relay failed'}", 125)
        proc.stdout.close()
        self._relays[m.channel] = (m, done)
        # A thread of its own for as long as the relay lives: in the loop's default
        # executor (5 threads on one vCPU) the relays' readers would starve every
        # later run_in_executor, the next map's _open_stream included.
        threading.Thread(target=_log_lines, args=(proc.stderr, m.guest),
                         name=f"map-{m.channel}-log", daemon=True).start()  # fmt: skip
        log.info("map %d mounted at %s%s", m.channel, m.guest, " (ro)" if m.read_only else "")

    def _open_stream(self, channel: int, deadline: float) -> int:
        """A blocking fd for the channel's stream, once the host is on the other end."""
        if self.transport == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect((HOST_CID, p.MAP_VSOCK_PORT_BASE + channel))
                sock.settimeout(None)
            except BaseException:
                sock.close()
                raise
            return sock.detach()
        from fcvm.session.transport import find_virtio_port

        name = p.MAP_PORT_NAME.format(channel)
        device = find_virtio_port(name)
        if device is None:
            raise OSError(f"no virtio-serial port named {name}")
        fd = os.open(f"/dev/{device}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            # Until the host is connected the port reads as ended (POLLHUP): the relay
            # would take that for the end of the stream.
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while any(events & select.POLLHUP for _, events in poller.poll(0)):
                if time.monotonic() > deadline:
                    raise OSError(f"the host is not connected to {name}")
                time.sleep(_POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _log_lines(stream: IO[bytes], guest: str) -> None:
    """The relay's later words (I/O errors) into the agent's log, until it exits."""
    for line in iter(stream.readline, b""):
        log.warning("map %s: %s", guest, line.decode(errors="replace").rstrip())
    stream.close()
