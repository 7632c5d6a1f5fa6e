"""children.py: a task that awaits blocking work in a thread is cancelled (a stop signal,
a timeout) and the work's child processes are stopped with it, so the thread ends
instead of running its child to the end (asyncio.run waits for it at exit)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from fcvm import children
from tests.unit.aio import arun

pytestmark = pytest.mark.unit


def test_cancelling_the_awaiting_task_stops_the_child_and_the_thread() -> None:
    seen: dict[str, object] = {}

    def work() -> str:
        try:
            proc = children.run(["sleep", "30"], capture_output=True, text=True)
        except children.Cancelled as exc:
            seen["raised"] = str(exc)
            raise
        return proc.stdout

    async def main() -> float:
        task = asyncio.create_task(children.in_thread(work))
        await asyncio.sleep(0.5)  # sleep is running in the thread
        assert subprocess.run(["pgrep", "-x", "-f", "sleep 30"], capture_output=True).stdout
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.shutdown_default_executor()  # what asyncio.run does at exit
        return time.monotonic() - t0

    waited = arun(main())
    assert waited < 10  # (the child would have held it for 30 s)
    assert seen["raised"] == "stopped while sleep ran"
    assert not subprocess.run(["pgrep", "-x", "-f", "sleep 30"], capture_output=True).stdout


def test_outside_a_scope_it_is_subprocess_run() -> None:
    done = children.run(["sh", "-c", "cat; exit 3"], input="x", capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, "x")

    async def main() -> subprocess.CompletedProcess[str]:
        return await children.in_thread(
            children.run, ["sh", "-c", "cat; exit 4"], input="y", capture_output=True, text=True
        )  # fmt: skip

    inside = arun(main())
    assert (inside.returncode, inside.stdout) == (4, "y")
