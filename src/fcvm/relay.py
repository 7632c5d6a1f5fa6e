"""The exec relay: how `fcvm exec` reaches a VM that another fcvm process owns.

The fcvm process running a VM holds its only agent session (a virtio-serial port
has one opener). It listens on <vm dir>/exec.sock; each `fcvm exec` connects there
and speaks the same session protocol, as if it talked to the agent. Every channel
the client opens is opened again on the VM's session with the same metadata (stdio
ids in a process channel are renamed to the new ids) and the two are joined:
bytes for stdio channels, whole JSON messages for process channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from fcvm import log
from fcvm.agent import protocol as p
from fcvm.agent.spec import ProcessSpec, SpecError
from fcvm.session import Channel, Session, SessionClosed
from fcvm.session.control import Handler

logger = log.get("relay")

HANDSHAKE_TIMEOUT = 10.0


async def _pipe_bytes(src: Channel, dst: Channel) -> None:
    while data := await src.read():
        await dst.write(data)
    await dst.write_eof()


async def _pipe_json(src: Channel, dst: Channel) -> None:
    while (msg := await src.recv_json()) is not None:
        await dst.send_json(msg)
    await dst.write_eof()


async def _join(client_ch: Channel, vm_ch: Channel) -> None:
    pipe = _pipe_json if client_ch.meta.get("kind") == p.KIND_PROC else _pipe_bytes
    tasks = [
        asyncio.create_task(pipe(client_ch, vm_ch)),
        asyncio.create_task(pipe(vm_ch, client_ch)),
    ]
    # Done when the guest side is finished (its output ended or it closed the
    # channel); the client's half may end earlier (stdin EOF) without ending it.
    with contextlib.suppress(Exception):
        await tasks[1]
    tasks[0].cancel()
    for ch in (client_ch, vm_ch):
        with contextlib.suppress(Exception):
            await ch.close()


async def _serve_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    vm_session: Callable[[], Session],
    on_request: Handler | None,
) -> None:
    client = Session(reader, writer, role="agent", loss_level=logging.DEBUG)
    if on_request is not None:
        client.requests.serve(on_request)  # (e.g. `fcvm snapshot create`: the owner's job)
    joins: set[asyncio.Task[None]] = set()
    opened: dict[int, Channel] = {}  # client channel id -> VM channel
    try:
        await client.start(timeout=HANDSHAKE_TIMEOUT)
        while True:
            ch = await client.accept()
            meta = dict(ch.meta)
            if meta.get("kind") == p.KIND_PROC:
                try:  # the client is another process: check what it asks before the VM sees it
                    ProcessSpec.from_json(meta.get("spec"))
                except SpecError as exc:
                    await _refuse(ch, f"malformed process spec: {exc}")
                    continue
                meta["stdio"] = {
                    fd: opened[int(cid)].id
                    for fd, cid in dict(meta.get("stdio", {})).items()
                    if int(cid) in opened
                }
            vm_ch = await vm_session().open_channel(meta)
            opened[ch.id] = vm_ch
            task = asyncio.create_task(_join(ch, vm_ch))
            joins.add(task)
            task.add_done_callback(joins.discard)
    except (SessionClosed, TimeoutError, ConnectionError, OSError) as exc:
        logger.debug("exec client gone: %s", exc)
    except Exception:
        logger.exception("exec relay failed")
    finally:
        # A client that went away takes its processes' channels with it.
        for task in joins:
            task.cancel()
        for vm_ch in opened.values():
            with contextlib.suppress(Exception):
                await vm_ch.close()
        await client.close()


async def _refuse(ch: Channel, message: str) -> None:
    with contextlib.suppress(Exception):
        await ch.send_json({"event": p.EV_ERROR, "message": message, "code": 125})
        await ch.close()


async def start_relay(
    path: Path, vm: Session | Callable[[], Session], on_request: Handler | None = None
) -> asyncio.Server:
    """Serve clients on path; vm is the VM's session, or a function returning the current
    one (a Machine may connect anew after a snapshot). A client's control requests go
    to on_request (the owner of the VM answers them itself)."""
    vm_session = vm if callable(vm) else (lambda: vm)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_client(reader, writer, vm_session, on_request)
        except asyncio.CancelledError:
            # The loop is ending (the VM stopped with a client attached). Python 3.11's
            # start_server calls task.exception() on a cancelled handler task and prints
            # the CancelledError's traceback; a handler that returns is quiet.
            writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))
