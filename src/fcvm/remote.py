"""Host side of the process protocol (fcvm.agent.protocol): one process in the guest.

`RemoteProcess.start(session, spec, stdio)` opens the stdio channels and the process
channel; `wait()` returns the exit code once every byte of output has been handed
to `stdio`; `signal()` and `resize()` reach the running process. `run_remote()` is
the whole thing for a terminal: raw mode and window-size following included.

Where the process's stdin/stdout/stderr go on this side is a `Stdio`: `LocalStdio`
(file descriptors, i.e. fcvm's own terminal or pipes) or `BufferStdio` (bytes in,
bytes out, for the Python API).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from fcvm import log
from fcvm.agent import protocol as p
from fcvm.agent.spec import ContainerSetup, ProcessSpec
from fcvm.errors import FcvmError, GuestError
from fcvm.session import Channel, Session, fdio
from fcvm.terminal import raw_mode, window_size

logger = log.get("remote")

EventHandler = Callable[[dict[str, Any]], None]
OUTPUT_DRAIN_SECONDS = 5.0


class SessionLost(GuestError):
    """The agent's session or a process channel ended without an exit code."""


class RemoteProcessError(FcvmError):
    """The guest could not run the process; carries podman's 125/126/127."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


class Stdio(ABC):
    """Where a remote process's stdio goes on this side."""

    tty: bool = False  # one channel both ways; stderr merges into stdout
    # Called when a reader of the output went away (EPIPE: `fcvm ... | head`); what a
    # SIGPIPE would do to a writer is the caller's to decide (the CLI ends the run).
    on_reader_gone: Callable[[], None] | None = None

    @property
    @abstractmethod
    def has_input(self) -> bool:
        """Whether the process gets a stdin stream (else /dev/null)."""

    def terminal_fd(self) -> int | None:
        """The local terminal to put in raw mode and follow the size of, if any."""
        return None

    def size(self) -> tuple[int, int] | None:
        """(rows, cols) of the local terminal, when there is one."""
        fd = self.terminal_fd()
        return window_size(fd) if fd is not None else None

    @abstractmethod
    async def copy_out(self, fd: int, channel: Channel) -> None:
        """Everything the process writes to fd (1, or 2) until EOF."""

    @abstractmethod
    async def copy_in(self, channel: Channel) -> None:
        """Feed the process's stdin, then EOF."""


@dataclass
class LocalStdio(Stdio):
    """fcvm's own file descriptors (its terminal, pipes, files)."""

    stdout: int = 1
    stderr: int = 2
    stdin: int | None = None  # None: the process gets /dev/null
    tty: bool = False

    def __post_init__(self) -> None:
        if self.tty and self.stdin is not None and not os.isatty(self.stdin):
            # (podman says so too: what comes through the terminal is taken as typed,
            # so a program that reads it in its own way may never see its end)
            logger.warning("the input device is not a TTY: -t with -i may not work as "
                           "expected (without -t, the input is a pipe)")  # fmt: skip

    @property
    def has_input(self) -> bool:
        return self.stdin is not None

    def terminal_fd(self) -> int | None:
        if not self.tty:
            return None
        for fd in (self.stdin, self.stdout):
            if fd is not None and os.isatty(fd):
                return fd
        return None

    async def copy_out(self, fd: int, channel: Channel) -> None:
        def failed(exc: OSError) -> None:  # (the run goes on: its exit code is its own)
            where = "output" if fd == 1 else "error output"
            logger.warning("cannot write the container's %s: %s (the rest of it is "
                           "dropped)", where, exc.strerror or exc)  # fmt: skip

        await fdio.pump_channel_to_fd(channel, self.stdout if fd == 1 else self.stderr,
                                      on_reader_gone=self.on_reader_gone,
                                      on_error=failed)  # fmt: skip

    async def copy_in(self, channel: Channel) -> None:
        assert self.stdin is not None
        await fdio.pump_fd_to_channel(self.stdin, channel)


@dataclass
class BufferStdio(Stdio):
    """Bytes in (optional), bytes out: what the Python API's exec and run capture."""

    input: bytes | None = None
    tty: bool = False
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def has_input(self) -> bool:
        return self.input is not None

    async def copy_out(self, fd: int, channel: Channel) -> None:
        sink = self.stdout if fd == 1 else self.stderr
        while data := await channel.read():
            sink += data

    async def copy_in(self, channel: Channel) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            if self.input:
                await channel.write(self.input)
            await channel.write_eof()


class RemoteProcess:
    """A process running in the guest: its channels, its events, its exit code."""

    def __init__(
        self, proc: Channel, channels: dict[int, Channel], stdio: Stdio,
        on_event: EventHandler | None,
    ) -> None:  # fmt: skip
        self.channel = proc
        self._channels = channels
        self._stdio = stdio
        self._on_event = on_event
        self.pid: int | None = None  # the agent's pid for it, once started
        self.exit_code: int | None = None
        outs = [(1, channels[0] if stdio.tty else channels[1])]
        if not stdio.tty:
            outs.append((2, channels[2]))
        self._outputs = [asyncio.create_task(stdio.copy_out(fd, ch)) for fd, ch in outs]
        self._inputs = []
        if stdio.has_input:
            self._inputs.append(asyncio.create_task(stdio.copy_in(channels[0])))

    @classmethod
    async def start(
        cls, session: Session, spec: ProcessSpec, stdio: Stdio, *,
        on_event: EventHandler | None = None,
    ) -> RemoteProcess:  # fmt: skip
        """Open the stdio channels and the process channel: the agent starts it."""
        if spec.tty != stdio.tty or spec.interactive != stdio.has_input:
            spec = replace(spec, tty=stdio.tty, interactive=stdio.has_input)
        size = stdio.size() if stdio.tty else None
        if size is not None:  # else the spec's own (24x80 unless asked otherwise)
            spec = replace(spec, rows=size[0], cols=size[1])
        channels: dict[int, Channel] = {}
        wanted = [0] if stdio.tty else [*([0] if stdio.has_input else []), 1, 2]
        for fd in wanted:
            channels[fd] = await session.open_channel({"kind": p.KIND_STDIO, "fd": fd})
        proc = await session.open_channel(
            {
                "kind": p.KIND_PROC,
                "spec": spec.to_json(),
                "stdio": {str(fd): ch.id for fd, ch in channels.items()},
            }
        )
        return cls(proc, channels, stdio, on_event)

    async def wait(self) -> int:
        """The exit code, after all output before it has reached stdio.

        RemoteProcessError if the guest could not run it (125/126/127), SessionLost if
        the channel ended without an exit code."""
        if self.exit_code is not None:
            return self.exit_code
        try:
            while True:
                event = await self.channel.recv_json()
                if event is None:
                    raise SessionLost(
                        "the guest agent closed the process channel without an exit code"
                    )
                if not isinstance(event, dict):
                    continue
                kind = event.get("event")
                if kind == p.EV_STARTED and isinstance(event.get("pid"), int):
                    self.pid = event["pid"]
                if self._on_event is not None:
                    self._on_event(event)
                if kind == p.EV_EXIT:
                    code = int(event["code"])
                    break
                if kind == p.EV_ERROR:
                    raise RemoteProcessError(
                        str(event.get("message")), int(event.get("code", 125))
                    )
            # Frames arrive in order, so the output before the exit event is already
            # here; the pumps only have buffered data left to hand over.
            await asyncio.wait(self._outputs, timeout=OUTPUT_DRAIN_SECONDS)
            self.exit_code = code
            return code
        finally:
            await self.close()

    async def signal(self, signum: int) -> None:
        """Send signal signum to the process (its process group in the guest)."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.channel.send_json({"op": p.OP_SIGNAL, "signal": int(signum)})

    async def resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.channel.send_json({"op": p.OP_RESIZE, "rows": rows, "cols": cols})

    async def close(self) -> None:
        """Stop relaying and close the channels (the agent then kills a process that is
        still running: nothing outlives the one who started it)."""
        for task in (*self._outputs, *self._inputs):
            task.cancel()
        for ch in (*self._channels.values(), self.channel):
            with contextlib.suppress(Exception):
                await ch.close()


async def prepare_container(
    session: Session, setup: ContainerSetup, *, on_event: EventHandler | None = None
) -> dict[str, Any]:
    """Have the agent prepare the container up to its gate; its `ready` event.
    RemoteProcessError (with podman's code) if it cannot."""
    ch = await session.open_channel({"kind": p.KIND_PREPARE, "setup": setup.to_json()})
    try:
        while (event := await ch.recv_json()) is not None:
            if not isinstance(event, dict):
                continue
            if on_event is not None:
                on_event(event)
            if event.get("event") == p.EV_READY:
                return event
            if event.get("event") == p.EV_ERROR:
                raise RemoteProcessError(str(event.get("message")), int(event.get("code", 125)))
        raise SessionLost("the guest agent closed the prepare channel without an answer")
    finally:
        with contextlib.suppress(Exception):
            await ch.close()


async def run_remote(
    session: Session,
    spec: ProcessSpec,
    stdio: Stdio,
    *,
    on_event: EventHandler | None = None,
    on_start: Callable[[RemoteProcess], None] | None = None,
) -> int:
    """Run spec in the guest with stdio; returns its exit code (RemoteProcessError if it
    cannot run). A local terminal goes raw for the duration and its size is followed."""
    proc = await RemoteProcess.start(session, spec, stdio, on_event=on_event)
    if on_start is not None:
        on_start(proc)
    raw_fd = stdio.terminal_fd() if stdio.has_input else None
    with raw_mode(raw_fd), _follow_window_size(stdio, proc):
        return await proc.wait()


@contextlib.contextmanager
def _follow_window_size(stdio: Stdio, proc: RemoteProcess) -> Iterator[None]:
    """Forward SIGWINCH as resize requests, and the terminal's size at the start."""
    fd = stdio.terminal_fd()
    if fd is None:
        yield
        return
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_winch() -> None:
        size = window_size(fd)
        if size is not None:
            task = asyncio.ensure_future(proc.resize(*size))
            pending.add(task)
            task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGWINCH, on_winch)
    # And the size now: a process attached to rather than started (a clone's, a service
    # restored from a startup snapshot) still has the size of the terminal it was
    # started at. (An unchanged size changes nothing: the kernel signals changes only.)
    on_winch()
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
