"""Host side of the process protocol (fcvm.agent.protocol): run one process in the
guest with local file descriptors wired to its stdio, and return its exit code.

Used by `fcvm podman run` (the container itself) and `fcvm exec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fcvm import log
from fcvm.agent import protocol as p
from fcvm.errors import FcvmError, GuestError
from fcvm.session import Channel, Session, fdio
from fcvm.terminal import raw_mode, window_size

logger = log.get("remote")


class SessionLost(GuestError):
    """The agent's session or a process channel ended without an exit code."""


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

    def terminal_fd(self) -> int | None:
        """The local terminal to put in raw mode and follow the size of, if any."""
        if not self.tty:
            return None
        for fd in (self.stdin, self.stdout):
            if fd is not None and os.isatty(fd):
                return fd
        return None

    def tty_spec(self) -> dict[str, Any]:
        """tty/rows/cols for a process spec: the real size of our terminal."""
        from fcvm.terminal import window_size

        if not self.tty:
            return {"tty": False}
        fd = self.terminal_fd()
        rows, cols = (window_size(fd) if fd is not None else None) or (24, 80)
        return {"tty": True, "rows": rows, "cols": cols}


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
    raw_fd = stdio.terminal_fd() if stdio.stdin is not None else None
    with raw_mode(raw_fd), _follow_window_size(stdio, proc):
        return await _attach(proc, channels, stdio, on_event)


@contextlib.contextmanager
def _follow_window_size(stdio: LocalStdio, proc: Channel) -> Iterator[None]:
    """Forward SIGWINCH as resize requests (the seed tool never did)."""
    fd = stdio.terminal_fd()
    if fd is None:
        yield
        return
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_winch() -> None:
        size = window_size(fd)
        if size is not None:
            msg = {"op": p.OP_RESIZE, "rows": size[0], "cols": size[1]}
            task = asyncio.ensure_future(proc.send_json(msg))
            pending.add(task)
            task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGWINCH, on_winch)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def _attach(
    proc: Channel,
    channels: dict[int, Channel],
    stdio: LocalStdio,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> int:
    outputs = []
    if stdio.tty:
        outputs.append(asyncio.create_task(fdio.pump_channel_to_fd(channels[0], stdio.stdout)))
    else:
        outputs.append(asyncio.create_task(fdio.pump_channel_to_fd(channels[1], stdio.stdout)))
        outputs.append(asyncio.create_task(fdio.pump_channel_to_fd(channels[2], stdio.stderr)))
    inputs = []
    if stdio.stdin is not None:
        inputs.append(asyncio.create_task(fdio.pump_fd_to_channel(stdio.stdin, channels[0])))
    try:
        while True:
            event = await proc.recv_json()
            if event is None:
                raise SessionLost("the guest agent closed the process channel without an exit code")
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
