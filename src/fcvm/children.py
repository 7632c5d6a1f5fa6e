"""Child processes that must not outlive what started them.

With fcvm itself: `die_with_parent` (PR_SET_PDEATHSIG, in the child) has the kernel
signal a child when fcvm dies, even by kill -9 (VMMs, the KVM probe, mmdebstrap).

With a run: exporting an image and building its store run in a thread (so that the
event loop stays responsive) and spend their time in child processes: podman save,
podman load, mkfs.ext4. A stop signal cancels the run's task at once, but nothing
cancels a thread: it went on until its child finished - seconds, or minutes for a
large image - and asyncio.run waited for it before fcvm could exit. So `in_thread` runs
such work in a Scope (a ContextVar, which asyncio.to_thread carries into its thread);
`run` starts children in the current scope; when the awaiting task is cancelled, the
scope's children get SIGTERM and new ones are refused (`Cancelled`), and the thread
unwinds through its usual cleanup (temporary files, private storage) at once.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from fcvm.errors import FcvmError

T = TypeVar("T")
PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """In a child (a preexec_fn, or after fork): the kernel sends it signum when its
    parent dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


class Cancelled(FcvmError):
    """The run this work belonged to was stopped."""


class Scope:
    """The child processes of one piece of blocking work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen[Any]] = set()
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                child.terminate()

    def start(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        with self._lock:
            if self.cancelled:
                raise Cancelled(f"stopped before {argv[0]} ran")
            child = subprocess.Popen(list(argv), **kwargs)
            self._children.add(child)
        return child

    def done(self, child: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._children.discard(child)


_current: ContextVar[Scope | None] = ContextVar("fcvm_cancel_scope", default=None)


def run(argv: Sequence[str], *, input: str | None = None, **kwargs: Any
        ) -> subprocess.CompletedProcess[Any]:  # fmt: skip
    """subprocess.run(argv, input=, capture_output=, text=, env=...), stopped with the
    current scope (Cancelled once it is)."""
    scope = _current.get()
    if scope is None:
        return subprocess.run(list(argv), input=input, **kwargs)
    if kwargs.pop("capture_output", False):
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    child = scope.start(argv, **kwargs)
    try:
        out, err = child.communicate(input)
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        scope.done(child)
    if scope.cancelled:
        raise Cancelled(f"stopped while {argv[0]} ran")
    return subprocess.CompletedProcess(list(argv), child.returncode, out, err)


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """await func(*args, **kwargs) in a thread, in a scope of its own: if the awaiting task is
    cancelled, func's children are stopped too (func then ends, raising Cancelled)."""
    import asyncio  # (setup packs ext4 images through run() without an event loop)

    scope = Scope()
    token = _current.set(scope)
    try:
        return await asyncio.to_thread(func, *args, **kwargs)
    except asyncio.CancelledError:
        scope.cancel()
        raise
    finally:
        _current.reset(token)
