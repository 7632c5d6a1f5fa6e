"""How a Machine makes each thing it owns (`Parts`), and what it needs of each.

The defaults are the real ones (fcvm.net, the VMM registry, the agent session, the
control socket relay, the --map servers); tests pass fakes to exercise every failure
and cancellation point of Machine.start() without VMs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fcvm import state
from fcvm.errors import GuestError, ProtocolError
from fcvm.net.publish import PortForward
from fcvm.session import Session
from fcvm.vmm.base import VmConfig, Vmm
from fcvm.vmm.select import Choice
from fcvm.volumes.spec import VolumeMap


class NetworkLike(Protocol):
    """What a Machine needs of a network (fcvm.net.NetHandle)."""

    netns_exec: tuple[str, ...]
    host_ip: str
    guest_ip: str
    forwards: list[PortForward]

    mac: str

    def record(self) -> dict[str, Any]: ...
    def guest_params(self) -> dict[str, str]: ...
    def guest_cmdline(self) -> list[str]: ...
    def vmm_net(self) -> Any: ...
    def proxy_env(self) -> dict[str, str]: ...
    def teardown(self) -> None: ...
    def check(self) -> str | None: ...


class Closable(Protocol):
    def close(self) -> None: ...


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Records(Protocol):
    """Where VM records live (fcvm.state)."""

    def create(self, record: state.VmRecord) -> object: ...
    def update(self, record: state.VmRecord, **changes: Any) -> None: ...
    def add_reaper(self, record: state.VmRecord, reaper: state.Reaper) -> None: ...
    def remove(self, vm_id: str) -> None: ...


def _setup_network(vm_id: str, mode: str, publish: list[PortForward], workdir: Path) -> NetworkLike:
    from fcvm.net import setup_network

    return setup_network(vm_id, mode, publish, workdir=workdir)


def _reap_network() -> state.Reaper:
    from fcvm.net import reap_record

    return reap_record


async def open_agent_session(
    vmm: Vmm,
    timeout: float,
    resume: bool = False,
    mark: Callable[[str], None] | None = None,
    hello_extra: dict[str, Any] | None = None,
) -> Session:
    """Connect to the guest agent and complete the session handshake. With resume, the
    VM is a paused restore: it runs once the host is connected (so the guest never
    sees its agent port without a host). mark(step) records the steps' times;
    hello_extra goes into our HELLO (a restored guest's identity)."""
    session: Session | None = None
    try:
        reader, writer = await vmm.open_agent_stream(timeout=timeout)
        if resume:
            vmm.resume()
            if mark is not None:
                mark("vm-resumed")
        session = Session(reader, writer, role="host", hello_extra=hello_extra)
        await session.start(timeout=timeout)
    except BaseException as exc:
        if session is not None:  # e.g. cancelled while waiting for HELLO: close it quietly
            await asyncio.shield(session.close())
        if isinstance(exc, TimeoutError | ProtocolError | ConnectionError):
            raise _no_session(vmm, exc, timeout) from None
        raise
    return session


def _no_session(vmm: Vmm, exc: BaseException, timeout: float) -> GuestError:
    if isinstance(exc, TimeoutError):
        return GuestError(
            f"the guest agent did not answer within {timeout:.0f}s",
            hint=vmm.failure_detail() or None,
        )
    return GuestError(f"no session with the guest agent: {exc}", hint=vmm.failure_detail() or None)


async def _start_control(
    path: Path, session: Callable[[], Session], on_request: Any = None
) -> Closable:
    from fcvm.relay import start_relay

    return await start_relay(path, session, on_request)


def _serve_volumes(maps: tuple[VolumeMap, ...], vmm: Vmm) -> Stoppable:
    from fcvm.machine.volumes import VolumeServers

    servers = VolumeServers(maps, vmm)
    servers.start()
    return servers


def _make_vmm(choice: Choice, config: VmConfig) -> Vmm:
    from fcvm.vmm.select import instantiate

    return instantiate(choice, config)


@dataclass(frozen=True)
class Parts:
    """How a Machine makes each thing it owns. Defaults are the real ones."""

    records: Records = field(default_factory=lambda: state)
    setup_network: Callable[[str, str, list[PortForward], Path], NetworkLike] = _setup_network
    network_reaper: Callable[[], state.Reaper] = _reap_network
    make_vmm: Callable[[Choice, VmConfig], Vmm] = _make_vmm
    open_session: Callable[..., Awaitable[Session]] = open_agent_session
    start_control: Callable[..., Awaitable[Closable]] = _start_control
    serve_volumes: Callable[[tuple[VolumeMap, ...], Vmm], Stoppable] = _serve_volumes
