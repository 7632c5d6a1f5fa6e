"""The agent's entry point: PID 1 setup, then serve hosts, one session after another.

A session serves requests until it ends. What ends it decides what comes next:
- the host went away (EOF, reset) while the session was live: fcvm is gone, so the VM
  is of no use to anyone - power off;
- it ended quiesced (see session/mux.py): a snapshot was taken and this guest is now a
  restore of it. Either a new host's HELLO arrived on the same transport (it takes the
  session over) or the transport reset (Firecracker resets vsock connections on
  restore; a virtio-serial host may reconnect): wait for the new host and serve it.

The container (container.py) lives across sessions; exec and guest-command processes
belong to the session that started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from typing import Any

from fcvm.agent import identity, procs, system
from fcvm.agent import protocol as p
from fcvm.agent.container import Container
from fcvm.agent.image import ProcError
from fcvm.agent.runner import run_proc, send_error
from fcvm.agent.spec import ContainerSetup, ProcessSpec, SpecError
from fcvm.errors import ProtocolError
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
    """Serves one session: channels become requests, control requests are answered."""

    def __init__(
        self,
        session: Session,
        reaper: procs.Reaper,
        container: Container,
        net_params: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.reaper = reaper
        self.container = container
        self.net_params = net_params if net_params is not None else {}
        self._stdio: dict[int, Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        """Handle channels until the session ends."""
        self.session.requests.serve(self._control)
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
                    for fd, cid in dict(ch.meta.get("stdio", {})).items()
                    if str(cid).isdigit() and int(cid) in self._stdio
                }
                self._spawn(self._proc(ch, stdio))
            elif kind == p.KIND_PREPARE:
                self._spawn(self._prepare(ch))
            else:
                log.warning("unknown channel kind %r; closing it", kind)
                await ch.close()
        for task in list(self._tasks):
            task.cancel()

    async def _proc(self, ch: Channel, stdio: dict[int, Channel]) -> None:
        try:
            spec = ProcessSpec.from_json(ch.meta.get("spec"))
        except SpecError as exc:
            await send_error(ch, f"malformed process spec: {exc}", 125)
            await ch.close()
            return
        if spec.mode == p.MODE_CONTAINER:
            await self.container.run(ch, stdio, spec)
            return
        if spec.maps:  # an exec in a clone given --map: mounted first
            try:
                await self.container.maps.mount(self.container.pid, spec.maps)
            except ProcError as exc:
                await send_error(ch, str(exc), exc.code)
                await ch.close()
                return
        await run_proc(ch, stdio, self.reaper, spec, self.container)

    async def _prepare(self, ch: Channel) -> None:
        try:
            setup = ContainerSetup.from_json(ch.meta.get("setup"))
        except SpecError as exc:
            await send_error(ch, f"malformed container setup: {exc}", 125)
            await ch.close()
            return
        await self.container.prepare(ch, setup)

    async def _control(self, op: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        raise ProcError(f"unknown control op {op!r}", 125)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _open_transport(params: dict[str, str]) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]:  # fmt: skip
    from fcvm.session import transport

    if params.get("transport") == "vsock":
        return await transport.accept_vsock(int(params.get("port", "1024")))
    # (no timeout to speak of: a restored VM may wait a while for its new host)
    return await transport.open_virtio_serial(params.get("serial", "fcvm.0"), timeout=86400.0)


def _identity(hello: dict[str, Any], net_params: dict[str, str], container: Container,
              read_at: float) -> dict[str, Any] | None:  # fmt: skip
    """A host that restored this guest sends its new identity in its HELLO: applied
    before anything else of the session is handled, the outcome in our HELLO (with the
    milliseconds since the HELLO was read, when it was read by the session it replaced)."""
    wanted = hello.get("identity")
    if not isinstance(wanted, dict):
        return None
    try:
        done = identity.apply(wanted, net_params, container)
        if read_at:
            done["since_hello_ms"] = round((time.monotonic() - read_at) * 1000, 1)
        return {"identity": done}
    except Exception as exc:  # the host treats this as a failed restore
        log.exception("identity failed")
        return {"identity": {"error": str(exc) or type(exc).__name__}}


async def serve(params: dict[str, str], net_params: dict[str, str]) -> None:
    reaper = procs.Reaper(asyncio.get_running_loop())
    container = Container(reaper, params.get("transport", "serial"))
    stream = None
    hello = None
    hello_at = 0.0
    while True:
        if stream is None:
            stream = await _open_transport(params)
        session = Session(
            *stream, role="agent", peer_hello=hello,
            on_hello=functools.partial(_identity, net_params=net_params, container=container,
                                       read_at=hello_at),
        )  # fmt: skip
        try:
            await session.start()
        except (ProtocolError, TimeoutError) as exc:
            log.warning("no session with the host: %s", exc)
            await session.close()
            stream, hello = None, None
            continue
        log.debug("session %s established", session.session_id)
        await Agent(session, reaper, container, net_params).serve()
        hello, hello_at = session.takeover_hello, session.takeover_at
        if hello is not None:
            log.debug("session %s replaced by a new host", session.session_id)
            continue
        await session.close()
        if not session.ended_quiesced:
            return  # the host is gone for good
        log.info("the host went away after a snapshot: waiting for the next one")
        stream = None


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)  # the guest console (console.log on the host)
    handler.setFormatter(_UptimeFormatter("fcvm-agent [%(uptime)s] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    log.info("started")
    is_init = os.getpid() == 1
    params = system.read_cmdline()
    net_params: dict[str, str] = {}
    try:
        if is_init:
            os.environ.setdefault("PATH", GUEST_PATH)
            os.environ.setdefault("HOME", "/root")
            system.mount_basics()
            params = system.read_cmdline()
            system.mount_storage(params.get("storage"))
            system.set_hostname(params.get("hostname", "fcvm"))
            system.configure_network(params)
            net_params = {k: params[k] for k in identity.NET_KEYS if k in params}
            net_params["mac"] = identity.current_mac()
            log.info("system ready")
        asyncio.run(serve(params, net_params))
    except Exception:
        log.exception("agent failed")
    finally:
        if is_init:
            with contextlib.suppress(Exception):
                system.power_off()


if __name__ == "__main__":
    main()
