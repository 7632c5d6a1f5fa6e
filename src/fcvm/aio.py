"""fcvm's Python API for asyncio: the same names as `fcvm`, awaited.

    async with await fcvm.aio.start("localhost/fcvm-busybox", ["sleep", "600"]) as vm:
        r = await vm.exec(["cat", "/etc/os-release"])
    r = await fcvm.aio.run("localhost/fcvm-busybox", ["echo", "hi"])
"""

from __future__ import annotations

from fcvm.api import AsyncVM, Completed, ExecTimeout, Port, ProcessFailed, VmOptions
from fcvm.api import run_async as run
from fcvm.api import start_async as start

__all__ = ["AsyncVM", "Completed", "ExecTimeout", "Port", "ProcessFailed", "VmOptions", "run",
           "start"]  # fmt: skip
