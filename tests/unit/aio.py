"""Running a coroutine in a test so that nothing the event loop swallowed goes unseen."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

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
