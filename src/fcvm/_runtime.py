"""The thread that owns every VM the Python API starts in this process.

Machines are asyncio objects, and a VMM's parent-death signal follows the thread that
forked it, so the API runs all of them on one event loop in one long-lived daemon
thread: `fcvm.start()` from any thread (or any other event loop) hands its work to
it and waits. At interpreter exit every VM still running is stopped; if the process
dies without that (kill -9), the VMMs die with it and the next fcvm command reaps
the rest, as for the CLI.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

STOP_AT_EXIT_SECONDS = 30.0


class Runtime:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fcvm-runtime", daemon=True)
        self._thread.start()
        self._ready.wait()
        # Coroutines that stop live VMs, run at exit (registered by the API's VMs).
        self.finalizers: dict[int, Any] = {}
        atexit.register(self._at_exit)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_runtime(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run coro on the runtime's loop and wait for it (from any other thread)."""
        if self.in_runtime():
            coro.close()
            raise RuntimeError("fcvm's blocking API cannot be called from its own runtime")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the runtime's loop, awaited from another event loop."""
        if self.in_runtime():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def _at_exit(self) -> None:
        pending = [self.submit(stop()) for stop in list(self.finalizers.values())]
        concurrent.futures.wait(pending, timeout=STOP_AT_EXIT_SECONDS)


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """The process's runtime, started on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime
