"""Moving bytes between file descriptors and channels, on both sides of a session.

The agent pumps its children's pipes and PTYs; the host pumps fcvm's own stdin,
stdout and stderr. Both use these, so both behave the same at EOF, on a broken
pipe and under flow control. Stdlib only (the agent imports it in the guest).

Reads wait for readability in the event loop and then read, so they work on
blocking descriptors too (fcvm must not set O_NONBLOCK on a terminal it shares
with the user's shell). Regular files are never "not ready", so they are read in
a thread instead, and so is what epoll refuses (EPERM: /dev/null, say, as stdin).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Callable

from fcvm.session.channel import Channel

CHUNK = 65536


async def _ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (
        loop.add_reader, loop.remove_reader)  # fmt: skip
    add(fd, fut.set_result, None)
    try:
        await fut
    finally:
        remove(fd)


async def read_fd(fd: int, n: int = CHUNK) -> bytes:
    """Up to n bytes from fd when it has some; b"" at EOF (and for a PTY whose
    other side is closed, which reports EIO)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return await _read_in_thread(fd, n)
    while True:
        try:
            await _ready(fd, write=False)
        except PermissionError:  # epoll refuses it (/dev/null and other devices)
            return await _read_in_thread(fd, n)
        try:
            return os.read(fd, n)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


async def _read_in_thread(fd: int, n: int) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, os.read, fd, n)


async def write_fd(fd: int, data: bytes) -> None:
    """All of data to fd, waiting for room when fd is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _ready(fd, write=True)


async def pump_fd_to_channel(fd: int, channel: Channel, *, close_fd: bool = False) -> None:
    """fd -> channel until EOF, then EOF on the channel. A descriptor that cannot be
    read ends as at EOF: the other side must never be left waiting for it."""
    try:
        while data := await _read_or_eof(fd):
            await channel.write(data)
        await channel.write_eof()
    except (ConnectionError, OSError):
        pass  # the session or the channel is gone
    finally:
        if close_fd:
            with contextlib.suppress(OSError):
                os.close(fd)


async def pump_channel_to_terminal(channel: Channel, master: int) -> None:
    """channel -> a PTY master (a process's terminal). Its end (stdin ended: `echo hi |
    fcvm ... -it`) is typed as the terminal's EOF character, as one ends input at a
    terminal with Ctrl-D (twice after a partial line): a program reading its terminal
    sees end of input (it waited forever). A lost session types nothing."""
    last = b"\n"
    try:
        while data := await channel.read():
            await write_fd(master, data)
            last = data[-1:]
        if not channel.closed:
            await write_fd(master, terminal_eof(master) * (1 if last == b"\n" else 2))
    except (ConnectionError, OSError):
        pass


def terminal_eof(master: int) -> bytes:
    """The terminal's EOF character (VEOF) while it edits lines; Ctrl-D, what a person
    would type, when it is raw (VEOF means nothing there, and raw modes may zero it):
    its reader relays bytes to another terminal or reads keys itself."""
    import termios

    try:
        attrs = termios.tcgetattr(master)
        char = attrs[6][termios.VEOF]
    except (termios.error, OSError, IndexError):
        return b"\x04"
    if attrs[3] & termios.ICANON and isinstance(char, bytes) and char != b"\x00":
        return char
    return b"\x04"


async def _read_or_eof(fd: int) -> bytes:
    try:
        return await read_fd(fd)
    except OSError:
        return b""


async def pump_channel_to_fd(
    channel: Channel, fd: int, *, close_fd: bool = False,
    on_reader_gone: Callable[[], None] | None = None,
    on_error: Callable[[OSError], None] | None = None,
) -> None:  # fmt: skip
    """channel -> fd until the channel's EOF. If fd stops taking data, the rest is read
    and dropped, so the sender is never left waiting for credit; on_reader_gone is
    called if that is because its reader went away (EPIPE: `| head`), on_error for any
    other failure (a full disk, /dev/full). close_fd gives the reader its EOF."""
    broken = False
    try:
        while data := await channel.read():
            if broken:
                continue
            try:
                await write_fd(fd, data)
            except OSError as exc:
                broken = True
                if isinstance(exc, BrokenPipeError):
                    if on_reader_gone is not None:
                        on_reader_gone()
                elif on_error is not None:
                    on_error(exc)
    except (ConnectionError, OSError):
        pass
    finally:
        if close_fd:
            with contextlib.suppress(OSError):
                os.close(fd)
