"""Clones: `fcvm snapshot run` - a VM restored from a named snapshot, a VM of its own.

    clone = CloneRun(CloneSource.named("web"), plan, stdio, exec_argv=("true",))
    code = await clone.run()

The snapshot (`fcvm snapshot create`, Machine.save_named) holds a running container;
the clone restores it with a new identity - its own name and hostname, network
namespace (same guest address in rootless mode), MAC, published ports, clock, entropy -
and its own copies of the writable disks; its memory is the snapshot's file mapped
privately (or, on Firecracker, served by `fcvm snapshot serve`: `--pid`). Then either
`exec_argv` runs in the clone's container and its exit code is the clone's (the clone
is torn down), or the clone attaches to the container like a `podman run` VM and runs
until it exits or is stopped. A clone is a ContainerRun with another source: signals,
health, `ls` and `exec` work the same.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from fcvm import imagecache, log, state
from fcvm.agent import protocol as p
from fcvm.agent.spec import ProcessSpec
from fcvm.container import ContainerRun
from fcvm.errors import StateError, UsageError
from fcvm.machine import Machine, MachineSpec, RestoreSource
from fcvm.net.publish import PortForward
from fcvm.plan import RunPlan
from fcvm.remote import RemoteProcess, Stdio
from fcvm.snapshot import store
from fcvm.snapshot.layout import KIND_NAMED, SnapshotError, open_snapshot
from fcvm.vmm.base import SnapshotFiles

logger = log.get("clone")


@dataclass(frozen=True)
class CloneSource:
    """Which snapshot, and whether its memory comes from a page server."""

    snapshot: str
    server_pid: int | None = None

    @classmethod
    def named(cls, name: str) -> CloneSource:
        return cls(name)

    @classmethod
    def served_by(cls, pid: int) -> CloneSource:
        """The snapshot the page server with this pid serves (UsageError if none)."""
        for rec in state.list_live():
            if rec.kind == "serve" and rec.pid == pid:
                return cls(str(rec.extra.get("snapshot", "")), pid)
        raise UsageError(
            f"no page server with pid {pid}",
            hint="fcvm ls lists them; fcvm snapshot serve NAME starts one",
        )


def snapshot_workload(name: str) -> dict[str, Any]:
    """What runs in a named snapshot's VM (its TTY and stdin decide a clone's stdio)."""
    try:
        return dict(open_snapshot(name)[1].workload)
    except SnapshotError as exc:
        raise UsageError(exc.line()) from None


def generated_name(snapshot: str) -> str:
    return f"{snapshot[:40]}-clone-{os.urandom(3).hex()}"


class CloneRun(ContainerRun):
    """A clone of a named snapshot (see the module docstring)."""

    def __init__(self, source: CloneSource, plan: RunPlan, stdio: Stdio, *,
                 exec_argv: tuple[str, ...] | None = None, forward_signals: bool = False,
                 network: str | None = None) -> None:  # fmt: skip
        super().__init__(plan, stdio, forward_signals=forward_signals)
        self.source = source
        self.exec_argv = exec_argv
        self.network = network  # None: the snapshot's own mode

    def restore_plan(self) -> tuple[MachineSpec, RestoreSource, store.Lease, dict[str, Any]]:
        """The clone's MachineSpec and what to restore; the snapshot held in use."""
        from fcvm.net import parse_publish
        from fcvm.vmm import registry

        try:
            snap, meta = open_snapshot(self.source.snapshot)
        except SnapshotError as exc:
            raise UsageError(exc.line()) from None
        if meta.kind != KIND_NAMED or not meta.machine:
            raise UsageError(
                f"snapshot {snap.name!r} is a {meta.kind} snapshot of the image "
                "cache, not one of a VM (fcvm snapshot create makes those)"
            )
        why = store.why_unusable(snap, meta)
        version = registry.load(meta.vmm).version() if meta.vmm else ""
        if why is None and meta.vmm_version != version:
            why = f"it was taken by {meta.vmm_version!r}, this host has {version!r}"
        if why is not None:
            raise UsageError(f"snapshot {snap.name!r} cannot be restored: {why}")
        publish: tuple[PortForward, ...] = tuple(parse_publish(list(self.plan.publish)))
        spec = MachineSpec.from_hardware(meta.machine, name=self.plan.name,
                                         network=self.network, publish=publish,
                                         maps=self.plan.maps)  # fmt: skip
        page_server = None
        files = SnapshotFiles(snap.memory, snap.vmstate)
        if self.source.server_pid is not None:
            backend = registry.load(spec.backend.backend)
            rec = next((r for r in state.list_live() if r.pid == self.source.server_pid), None)
            if backend.name == "firecracker" and rec is not None:
                from fcvm.snapshot.serving import socket_path

                files = SnapshotFiles(snap.memory, snap.vmstate, socket_path(snap.name))
                page_server = (rec.pid, rec.vm_id)
            else:
                # QEMU maps the snapshot's memory file privately: its pages fault in from
                # the page cache, shared by every clone - the page server's lazy, shared
                # fill, done by the kernel. The clone does not depend on the server.
                logger.info("%s restores from the memory file that pid %d serves (mapped "
                            "privately; the page cache shares it)", backend.name,
                            self.source.server_pid)  # fmt: skip
        lease = store.lease(snap.name)
        if lease is None:
            raise UsageError(f"snapshot {snap.name!r} is being removed")
        disks = {d: snap.dir / f for d, f in meta.disks.items()}
        source = RestoreSource(snap.name, files, disks, page_server)
        return spec, source, lease, meta.workload

    async def _run(self) -> int:
        state.reap_stale()
        spec, source, lease, workload = await asyncio.to_thread(self.restore_plan)
        self.timings.mark("image-ready")
        self.snapshot_workload = workload
        try:
            no_cache = imagecache.Keys(None, None, {}, {}, "a clone")
            return await self._in_machine(
                Machine(spec, restore=source, timings=self.timings), no_cache, KIND_NAMED
            )
        finally:
            lease.release()

    def _workload_info(self) -> dict[str, Any]:
        return dict(getattr(self, "snapshot_workload", {}) or super()._workload_info())

    async def _container(self, machine: Machine, spec: ProcessSpec) -> int:
        if self.exec_argv is None:
            return await super()._container(machine, spec)
        from fcvm.remote import run_remote

        exec_spec = ProcessSpec(mode=p.MODE_EXEC, argv=self.exec_argv,
                                interactive=self.stdio.has_input, tty=self.stdio.tty,
                                maps=spec.maps)  # fmt: skip

        def started(proc: RemoteProcess) -> None:
            self.process = proc

        code = await run_remote(machine.session, exec_spec, self.stdio, on_start=started)
        self.timings.mark("exec-exited")
        return code


def check_name_free(name: str) -> None:
    """One line before anything is made, if a VM of that name runs."""
    for rec in state.list_live():
        if rec.name == name:
            raise StateError(f"a VM named {name!r} is already running (pid {rec.pid})")
