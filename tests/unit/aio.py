"""Asyncio test helpers: running a coroutine so that nothing the event loop swallowed
goes unseen, and a connected host/agent Session pair over a socketpair."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

from fcvm.session import DEFAULT_WINDOW, Session

T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro on a fresh loop; fail on any exception the loop saw unhandled
    (e.g. "Task exception was never retrieved")."""
    errors: list[dict[str, Any]] = []
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        result = runner.run(coro)
        gc.collect()
        runner.get_loop().run_until_complete(asyncio.sleep(0))
    gc.collect()
    assert not errors, errors
    return result


async def stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


async def session_pair(
    host_window: int = DEFAULT_WINDOW, agent_window: int = DEFAULT_WINDOW
) -> tuple[Session, Session]:
    """A host and an agent Session connected to each other, both started."""
    (hr, hw), (ar, aw) = await stream_pair()
    host = Session(hr, hw, role="host", window=host_window)
    agent = Session(ar, aw, role="agent", window=agent_window)
    await asyncio.gather(host.start(5), agent.start(5))
    return host, agent
