"""The agent's entry point: PID 1 setup, then serve the host over the session.

The host opens channels; stdio channels are parked until the process channel that
names them arrives (channels are opened in order on one stream, so they always
come first). Each process runs as its own task, so execs run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from fcvm.agent import procs, system
from fcvm.agent import protocol as p
from fcvm.agent.runner import run_proc
from fcvm.session import Channel, Session, SessionClosed

log = logging.getLogger("fcvm.agent")

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _UptimeFormatter(logging.Formatter):
    """Stamps messages with the guest's uptime, like the kernel's own console lines."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            with open("/proc/uptime") as f:
                record.uptime = f.read().split()[0]
        except OSError:
            record.uptime = "?"
        return super().format(record)


class Agent:
    def __init__(self, session: Session, reaper: procs.Reaper) -> None:
        self.session = session
        self.reaper = reaper
        self._stdio: dict[int, Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Handle channels until the host goes away."""
        while True:
            try:
                ch = await self.session.accept()
            except SessionClosed:
                break
            kind = ch.meta.get("kind")
            if kind == p.KIND_STDIO:
                self._stdio[ch.id] = ch
            elif kind == p.KIND_PROC:
                stdio = {
                    int(fd): self._stdio.pop(int(cid))
                    for fd, cid in ch.meta.get("stdio", {}).items()
                    if int(cid) in self._stdio
                }
                task = asyncio.create_task(run_proc(ch, stdio, self.reaper))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                log.warning("unknown channel kind %r; closing it", kind)
                await ch.close()
        for task in list(self._tasks):
            task.cancel()


async def _open_transport(
    params: dict[str, str],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    from fcvm.session import transport

    if params.get("transport") == "vsock":
        return await transport.accept_vsock(int(params.get("port", "1024")))
    return await transport.open_virtio_serial(params.get("serial", "fcvm.0"), timeout=30.0)


async def serve(params: dict[str, str]) -> None:
    reaper = procs.Reaper(asyncio.get_running_loop())
    reader, writer = await _open_transport(params)
    session = Session(reader, writer, role="agent")
    await session.start()
    log.info("session established")
    await Agent(session, reaper).serve()
    await session.close()


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)  # the guest console (console.log on the host)
    handler.setFormatter(_UptimeFormatter("fcvm-agent [%(uptime)s] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    log.info("started")
    is_init = os.getpid() == 1
    params = system.read_cmdline()
    try:
        if is_init:
            os.environ.setdefault("PATH", GUEST_PATH)
            os.environ.setdefault("HOME", "/root")
            system.mount_basics()
            params = system.read_cmdline()
            system.set_hostname(params.get("hostname", "fcvm"))
            system.configure_network(params)
            log.info("system ready")
        asyncio.run(serve(params))
    except Exception:
        log.exception("agent failed")
    finally:
        if is_init:
            with contextlib.suppress(Exception):
                system.power_off()


if __name__ == "__main__":
    main()
