"""Child processes of the agent: spawning, stdio plumbing, and zombie reaping.

As PID 1 the agent inherits every orphan in the guest, so it reaps all children
itself on SIGCHLD. asyncio's own subprocess support would race that reaper for exit
statuses, so processes are started with subprocess.Popen and their exits are taken
from the reaper: for a pid someone waits on, the status resolves a future; any
other pid is just reaped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import subprocess
import termios
from collections.abc import Sequence
from typing import Any


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[int, asyncio.Future[int]] = {}
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def watch(self, proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
        """Future with the exit code of proc (negative signal number if killed).

        Call right after Popen returns, before awaiting: the SIGCHLD handler runs
        only in the loop, so the child's exit cannot be missed in between."""
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiters[proc.pid] = fut
        self.reap()  # it may already have exited
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fut = self._waiters.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(os.waitstatus_to_exitcode(status))


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    tty_fd: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv with pipes for stdout/stderr, or on the PTY slave tty_fd."""
    if tty_fd is not None:

        def _setup_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        return subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdin=tty_fd, stdout=tty_fd, stderr=tty_fd,
            preexec_fn=_setup_tty, close_fds=True,
        )  # fmt: skip
    return subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdin=stdin,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
        start_new_session=True,
    )  # fmt: skip


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_event(code: int) -> dict[str, Any]:
    """podman and shells report a signal death as 128+N."""
    return {"event": "exit", "code": 128 - code if code < 0 else code}
