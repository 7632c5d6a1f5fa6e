"""The host terminal during `-t`: raw mode that is always restored, and its size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
import tty
from collections.abc import Iterator


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on fd, or None if fd is not a terminal."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols = struct.unpack("HHHH", packed)[:2]
    return (rows, cols) if rows and cols else None


@contextlib.contextmanager
def raw_mode(fd: int | None) -> Iterator[None]:
    """Raw mode on fd for the duration (no-op when fd is not a terminal).

    Ctrl-C, Ctrl-Z and Ctrl-D become bytes for the remote program. The saved
    settings come back on every exit path, exceptions and signals included (a
    SIGTERM to fcvm cancels the run, which unwinds through here)."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
