"""Host side of the process protocol (fcvm.agent.protocol): run one process in the
guest with local file descriptors wired to its stdio, and return its exit code.

Used by `fcvm podman run` (the container itself) and `fcvm exec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fcvm import log
from fcvm.agent import protocol as p
from fcvm.errors import FcvmError, GuestError
from fcvm.session import Channel, Session

logger = log.get("remote")


class RemoteProcessError(FcvmError):
    """The guest could not run the process; carries podman's 125/126/127."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


@dataclass
class LocalStdio:
    stdout: int = 1
    stderr: int = 2
    stdin: int | None = None  # None: the process gets /dev/null
    tty: bool = False  # one channel both ways; stderr merges into stdout


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            import select

            select.select([], [fd], [])


async def _channel_to_fd(channel: Channel, fd: int) -> None:
    broken = False
    while True:
        data = await channel.read()
        if not data:
            return
        if broken:
            continue  # keep consuming so flow control does not stall the guest
        try:
            _write_all(fd, data)
        except BrokenPipeError:
            broken = True


async def _fd_to_channel(fd: int, channel: Channel) -> None:
    """Stream a local fd into the channel, then EOF. Regular files are read in a
    thread; pipes, sockets and terminals through the event loop (so cancelling
    never leaves a thread blocked in read)."""
    loop = asyncio.get_running_loop()
    regular = stat.S_ISREG(os.fstat(fd).st_mode)
    try:
        while True:
            if regular:
                data = await loop.run_in_executor(None, os.read, fd, 65536)
            else:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                data = os.read(fd, 65536)
            if not data:
                break
            await channel.write(data)
        await channel.write_eof()
    except (ConnectionError, OSError):
        pass


async def run_remote(
    session: Session,
    spec: dict[str, Any],
    stdio: LocalStdio,
    *,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_proc_channel: Callable[[Channel], None] | None = None,
) -> int:
    """Run spec in the guest; returns its exit code (RemoteProcessError if it cannot run)."""
    channels: dict[int, Channel] = {}
    if stdio.tty:
        channels[0] = await session.open_channel({"kind": p.KIND_STDIO, "fd": 0})
    else:
        if stdio.stdin is not None:
            channels[0] = await session.open_channel({"kind": p.KIND_STDIO, "fd": 0})
        channels[1] = await session.open_channel({"kind": p.KIND_STDIO, "fd": 1})
        channels[2] = await session.open_channel({"kind": p.KIND_STDIO, "fd": 2})
    proc = await session.open_channel(
        {
            "kind": p.KIND_PROC,
            "spec": spec,
            "stdio": {str(fd): ch.id for fd, ch in channels.items()},
        }
    )
    if on_proc_channel is not None:
        on_proc_channel(proc)
    outputs = []
    if stdio.tty:
        outputs.append(asyncio.create_task(_channel_to_fd(channels[0], stdio.stdout)))
    else:
        outputs.append(asyncio.create_task(_channel_to_fd(channels[1], stdio.stdout)))
        outputs.append(asyncio.create_task(_channel_to_fd(channels[2], stdio.stderr)))
    inputs = []
    if stdio.stdin is not None:
        inputs.append(asyncio.create_task(_fd_to_channel(stdio.stdin, channels[0])))
    try:
        while True:
            event = await proc.recv_json()
            if event is None:
                raise GuestError("the guest agent closed the process channel without an exit code")
            kind = event.get("event")
            if on_event is not None:
                on_event(event)
            if kind == p.EV_EXIT:
                code = int(event["code"])
                break
            if kind == p.EV_ERROR:
                raise RemoteProcessError(str(event.get("message")), int(event.get("code", 125)))
        # Frames arrive in order, so the output before the exit event is already
        # here; the pumps only have buffered data left to write.
        await asyncio.wait(outputs, timeout=5.0)
        return code
    finally:
        for task in (*outputs, *inputs):
            task.cancel()
        for ch in (*channels.values(), proc):
            with contextlib.suppress(Exception):
                await ch.close()
