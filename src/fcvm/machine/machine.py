"""Machine: one live VM and everything it holds, as one async context manager.

    async with Machine(spec) as m:              # record, network, VMM, agent session,
        code = await m.supervise(work(m))       # control socket - undone in reverse

What a Machine owns, in the order it makes them (each registers its undo the moment
it exists, so any failure, Ctrl-C or bug unwinds exactly what was made):

    record           the VM's state record (name checked unique under the lock)
    network          namespaces, TAP, slirp4netns or veth + NAT, leases
    VMM              the VMM process, launched by the spec's backend (it dies with us)
    agent session    the one session with the guest agent
    volume servers   a thread serving each --map host directory (machine/volumes.py)
    control socket   where `fcvm exec` and other clients reach the VM (relay.py)

Restoring instead of booting (`restore=RestoreSource`): the VMM loads a snapshot with
its memory mapped privately, the host connects to the agent before the guest runs,
a new session takes over the snapshot's (session/mux.py), and the guest is told its
new identity (hostname, clock, entropy, network: agent/identity.py). Any failure of
that is a RestoreFailed, after which the caller may boot instead. `snapshot()` writes
a snapshot of the running VM (quiesced session, paused VM) and lets it go on
(machine/snapshots.py).

If fcvm itself is killed -9, the VMM dies with it (PR_SET_PDEATHSIG), the network
helpers at EOF of pipes only we held, and the next fcvm command reaps the rest from
the record (state.reap_stale runs the reapers registered here).

How each piece is made is `Parts` (machine/parts.py): the real functions by default,
fakes in tests.
A Machine is started from the thread that runs its event loop, and that thread must
outlive the VM: the VMM's parent-death signal follows the thread that forked it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fcvm import log, paths, state
from fcvm.errors import GuestError, StateError
from fcvm.machine.parts import NetworkLike, Parts, Stoppable
from fcvm.machine.spec import MachineSpec
from fcvm.session import Session, SessionClosed
from fcvm.timings import Timings
from fcvm.vmm.base import SnapshotFiles, VmConfig, Vmm

logger = log.get("machine")

CONSOLE_TAIL = 256 << 10  # what _warn_of_disk_errors reads of the guest's console log

T = TypeVar("T")

BOOT_TIMEOUT = float(os.environ.get("FCVM_BOOT_TIMEOUT", "90"))
# A restored agent answers at once; one that does not in this long never will.
RESTORE_TIMEOUT = float(os.environ.get("FCVM_RESTORE_TIMEOUT", "20"))
VMM_POLL_SECONDS = 0.05
# Failures that may just be the VMM dying under us (supervise() then says so).
_LOST = (SessionClosed, ConnectionError, BrokenPipeError)


class RestoreFailed(GuestError):
    """A snapshot could not be restored; everything made for it is undone."""


@dataclass(frozen=True)
class RestoreSource:
    """A snapshot to restore instead of booting."""

    name: str
    files: SnapshotFiles
    disks: dict[str, Path] = field(default_factory=dict)  # writable drive -> its copy
    # The page server the VM's memory comes from (files.page_server), which the VM then
    # depends on: (pid, vm_id of its record) - see Machine.failure().
    page_server: tuple[int, str] | None = None


class Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"


class Machine:
    """One VM, booted from a MachineSpec; see the module docstring."""

    def __init__(
        self,
        spec: MachineSpec,
        *,
        restore: RestoreSource | None = None,
        parts: Parts | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.spec = spec
        self.restore_source = restore
        self.parts = parts or Parts()
        self.timings = timings or Timings()
        self.vm_id = state.new_vm_id()
        self.workdir = paths.vm_dir(self.vm_id)
        self.record = state.VmRecord(
            vm_id=self.vm_id,
            name=spec.name,
            image=spec.image,
            cpus=spec.vcpus,
            mem_mib=spec.mem_mib,
            extra=dict(spec.labels),
        )
        self.phase = Phase.NEW
        self.net: NetworkLike | None = None
        self.vmm: Vmm | None = None
        self.disks: dict[str, Path] = {}  # writable drive -> this VM's own copy
        self.reflinked_disks: dict[str, bool] = {}  # ... and whether its last copy was one
        self.reconnects = 0  # sessions opened anew after a snapshot (see snapshot())
        self.volumes: Stoppable | None = None  # the --map servers (machine/volumes.py)
        # One snapshot at a time: a second one's resume would release the agent while
        # the first is still being saved (a startup snapshot and a `snapshot create`
        # can be asked for at the same moment).
        self.snapshot_lock = asyncio.Lock()
        # What runs in the VM, for snapshots' metadata (the workload sets it).
        self.workload: dict[str, Any] = {}
        self._session: Session | None = None
        self._undo = contextlib.AsyncExitStack()

    def __repr__(self) -> str:
        return f"<Machine {self.spec.name} ({self.vm_id}) {self.phase.value}>"

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Machine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Make everything, in order; on any failure undo what was made and re-raise."""
        if self.phase is not Phase.NEW:
            raise StateError(f"{self!r} cannot start again")
        self.phase = Phase.STARTING
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        self.phase = Phase.RUNNING

    async def stop(self) -> None:
        """Undo everything in reverse order. Idempotent; never raises for a cleanup.

        A cancellation that arrives meanwhile (a second Ctrl-C) waits until the undo is
        complete: half a teardown would leave things behind."""
        if self.phase is Phase.STOPPED:
            return
        self.phase = Phase.STOPPED
        undo = asyncio.ensure_future(self._undo.aclose())
        try:
            await settled(undo)
        finally:
            undo.result()

    async def _start(self) -> None:
        spec, parts, undo = self.spec, self.parts, self._undo
        records = parts.records
        records.create(self.record)
        undo.callback(_quietly, "remove the record", records.remove, self.vm_id)
        if spec.network is not None:
            # The reaper first: an owner killed during the setup leaves a lease (same id)
            # that the reaper finds by the VM's id (net.reap_record).
            records.add_reaper(self.record, parts.network_reaper())
            net = parts.setup_network(self.vm_id, spec.network, list(spec.publish), self.workdir)
            self.net = net
            undo.callback(_quietly, "tear down the network", net.teardown)
            records.update(self.record, network=net.record())
            self.timings.mark("network-ready")
        await asyncio.to_thread(self._make_disks)
        # (registered before the VMM's stop, so it runs after it)
        undo.callback(_quietly, "check the VM's disks", self._warn_of_disk_errors)
        vmm = parts.make_vmm(spec.backend, self.vmm_config())
        self.vmm = vmm
        undo.callback(_quietly, "stop the VMM", vmm.stop)  # runs before the network's undo
        if self.restore_source is None:
            vmm.start()
            records.update(self.record, vmm=vmm.name, vmm_pid=vmm.pid, status="booting")
            self.timings.mark("vmm-started")
            session = await self.supervise(parts.open_session(vmm, BOOT_TIMEOUT, False))
            self._session = session
            undo.push_async_callback(_quietly_async, "close the session", session.close)
        else:
            session = await self._restore(vmm, self.restore_source)
        self.timings.mark("agent-ready")
        if spec.maps:
            self.volumes = parts.serve_volumes(spec.maps, vmm)
            undo.callback(_quietly, "stop serving the --map volumes", self.volumes.stop)
        control = await parts.start_control(
            paths.exec_socket(self.vm_id), lambda: self.session, self._client_request
        )
        undo.callback(_quietly, "close the control socket", control.close)
        records.update(self.record, status="running")

    async def _restore(self, vmm: Vmm, source: RestoreSource) -> Session:
        """Load the snapshot, take over its agent session, give the guest its identity.
        Anything going wrong is a RestoreFailed (the snapshot is suspect)."""
        records = self.parts.records
        records.update(self.record, extra={**self.record.extra, "snapshot": source.name})
        try:
            vmm.restore(source.files)
            records.update(self.record, vmm=vmm.name, vmm_pid=vmm.pid, status="restoring")
            self.timings.mark("vmm-restored")
            session = await self.supervise(self.parts.open_session(
                vmm, RESTORE_TIMEOUT, True, self.timings.mark, {"identity": self._identity()}
            ))  # fmt: skip
            self._session = session
            self._undo.push_async_callback(_quietly_async, "close the session", session.close)
            done = (session.peer_hello or {}).get("identity")
            if not isinstance(done, dict) or "error" in done:
                why = done.get("error") if isinstance(done, dict) else "no answer"
                raise GuestError(f"the guest did not take its new identity: {why}")
            logger.info("restored from %s: %s", source.name, done)
            return session
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            # Killed from outside (kill, the OOM killer): not the snapshot's fault, so no
            # cold boot and the cache entry stays. (A SIGSEGV/SIGABRT may be a bad one.)
            if vmm.poll() in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP):
                raise
            line = exc.line() if isinstance(exc, GuestError | StateError) else str(exc)
            raise RestoreFailed(f"cannot restore snapshot {source.name}: {line}") from exc

    def _make_disks(self) -> None:
        """Each writable drive's private copy in the VM's directory (removed with it):
        from the snapshot being restored, else the drive's image, else a blank ext4."""
        from fcvm.machine import disks

        source = self.restore_source
        for drive in self.spec.writable_drives():
            dest = self.workdir / f"disk-{drive.name}"
            self.workdir.mkdir(parents=True, exist_ok=True)
            origin = source.disks.get(drive.name) if source is not None else None
            origin = origin or drive.path
            if origin is not None:
                disks.private_copy(origin, dest)
            else:
                disks.make_blank(dest, drive.blank_size)
            self.disks[drive.name] = dest

    def _warn_of_disk_errors(self) -> None:
        """Say it, once the VM has stopped, if its disks failed it: a write the host
        could not make (the disk under the base directory full) is an I/O error in the
        guest, which the container saw as EIO, or not at all (its page cache took the
        write and the kernel failed to write it back)."""
        if not self.disks:
            return
        try:
            with open(self.workdir / "console.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - CONSOLE_TAIL))
                tail = f.read()
        except OSError:
            return
        if b"I/O error, dev vd" in tail:
            logger.warning("the VM's disk could not be written (I/O errors in the guest): "
                           "is the disk under %s full?", paths.base_dir())  # fmt: skip

    def _identity(self) -> dict[str, Any]:
        """What a guest restored from a snapshot must take on (agent/identity.py)."""
        msg: dict[str, Any] = {
            "hostname": self.spec.name,
            "time_ns": time.time_ns(),
            "entropy": base64.b64encode(os.urandom(64)).decode(),
        }
        if self.net is not None:
            msg["net"] = {**self.net.guest_params(), "mac": self.net.mac}
        return msg

    # -- snapshots of the running VM (machine/snapshots.py) ----------------------

    async def snapshot(self, files: SnapshotFiles) -> dict[str, str]:
        """Write a snapshot of this running VM; it goes on afterwards. Returns drive
        name -> disk file name beside the snapshot's files."""
        from fcvm.machine.snapshots import snapshot

        return await snapshot(self, files)

    async def save_named(self, name: str) -> dict[str, Any]:
        """`fcvm snapshot create`: a named snapshot of this VM (it goes on running)."""
        from fcvm.machine.snapshots import save_named

        return await save_named(self, name)

    async def _client_request(self, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A control-socket client's request, answered here (the owner's job)."""
        from fcvm.machine.snapshots import client_request

        return await client_request(self, op, msg)

    async def reconnect(self, old: Session) -> None:
        """The backend reset the agent's connection at the snapshot (Firecracker): the
        quiesced agent waits for a host, as after a restore; this one connects anew.
        Channels of the old session are gone: callers attached to the container
        attach again (`reconnects` says that happened)."""
        await old.close()
        assert self.vmm is not None
        session = await self.parts.open_session(self.vmm, RESTORE_TIMEOUT, False)
        self._session = session
        self._undo.push_async_callback(_quietly_async, "close the session", session.close)
        self.reconnects += 1

    def vmm_config(self) -> VmConfig:
        spec, net = self.spec, self.net
        return VmConfig(
            vm_id=self.vm_id,
            workdir=self.workdir,
            kernel=spec.kernel,
            initrd=spec.initrd,
            vcpus=spec.vcpus,
            mem_mib=spec.mem_mib,
            drives=spec.vmm_drives(self.disks),
            cmdline_extra=(
                f"fcvm.hostname={spec.name}",
                *(net.guest_cmdline() if net else ()),
                *spec.cmdline_extra,
            ),
            console_log=self.workdir / "console.log",
            net=net.vmm_net() if net else None,
            netns_exec=net.netns_exec if net else (),
        )

    # -- while running -----------------------------------------------------------

    @property
    def session(self) -> Session:
        if self._session is None or self.phase is not Phase.RUNNING:
            raise StateError(f"{self!r} is not running")
        return self._session

    def update_record(self, **changes: Any) -> None:
        """Change the VM's record (status, health, ...) as `fcvm ls` shows it."""
        if self.phase in (Phase.STARTING, Phase.RUNNING):
            self.parts.records.update(self.record, **changes)

    def proxy_env(self) -> dict[str, str]:
        return self.net.proxy_env() if self.net else {}

    def failure(self) -> GuestError | None:
        """A GuestError saying how the VM failed, if it has: the VMM ended, or a helper
        process it depends on (network) died and could not be replaced."""
        vmm = self.vmm
        code = vmm.poll() if vmm is not None else None
        if vmm is not None and code is not None:
            how = f"{vmm.name} exited with {code}"
            if code < 0:
                with contextlib.suppress(ValueError):
                    how = f"{vmm.name} was killed by {signal.Signals(-code).name}"
            detail = vmm.failure_detail()
            if detail == how:
                detail = ""
            if code == -signal.SIGBUS:  # (guest memory a file's pages it could not have)
                detail = detail or (f"a memory file could not give the VM a page: is the "
                                    f"disk under {paths.base_dir()} full?")  # fmt: skip
            return GuestError(f"the VM stopped unexpectedly ({how})", hint=detail or None)
        if self.net is not None:
            dead = self.net.check()
            if dead:
                return GuestError(f"the VM lost its network: {dead}")
            net = self.net.record()
            if net != self.record.network:  # a helper was replaced: name the new one
                self.update_record(network=net)
        server = self.restore_source.page_server if self.restore_source else None
        # A page server stopped properly first fills every VM in and removes its record;
        # killed, its record stays (stale) and the VM's missing pages can never come.
        if (
            server is not None
            and state.process_start_time(server[0]) is None
            and state.read_record(server[1]) is not None
        ):
            return GuestError(f"the page server serving the VM's memory (pid {server[0]}) "
                              "was killed")  # fmt: skip
        return None

    async def supervise(self, work: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        """Await work while watching the VMM. If the VMM ends first, work is cancelled and
        GuestError says why; a lost session that turns out to be a dead VMM is reported
        as the dead VMM (it is the cause)."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._watch_vmm())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                exc = task.exception()
                if isinstance(exc, (*_LOST, GuestError)):
                    await asyncio.wait({watch}, timeout=0.5)  # a dying VMM: say that
                    if watch.done():
                        watch.result()
                return task.result()
            watch.result()  # raises the VMM's failure
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            for t in (task, watch):
                t.cancel()
            # Let them finish unwinding before anyone tears down what they use (a
            # session half-opened when the VMM is killed would complain of it).
            await settled(task, watch)

    async def _watch_vmm(self) -> None:
        while True:
            failure = self.failure()
            if failure is not None:
                raise failure
            await asyncio.sleep(VMM_POLL_SECONDS)


@contextlib.contextmanager
def held_record(record: state.VmRecord, *reapers: state.Reaper) -> Iterator[state.VmRecord]:
    """A record of this process for the duration (name unique among live ones, reapers
    registered for a killed owner), removed at the end: how things that are not VMs but
    must be listed and reaped like them (a page server) are registered."""
    state.create(record)
    try:
        for reaper in reapers:
            state.add_reaper(record, reaper)
        yield record
    finally:
        state.remove(record.vm_id)


async def settled(*tasks: asyncio.Future[Any]) -> None:
    """Wait until tasks are done, even through a cancellation of the waiter (re-raised)."""
    cancelled = False
    while not all(t.done() for t in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            cancelled = True
    for t in tasks:  # retrieved, so the loop does not report them
        if not t.cancelled():
            t.exception()
    if cancelled:
        raise asyncio.CancelledError


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception as exc:  # an undo must never stop the others
        logger.warning("could not %s: %s", what, exc)


async def _quietly_async(what: str, fn: Callable[[], Awaitable[object]]) -> None:
    try:
        await fn()
    except Exception as exc:
        logger.warning("could not %s: %s", what, exc)
