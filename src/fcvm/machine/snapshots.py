"""Snapshots of a running Machine: `snapshot()` (the image cache's writes, and named
snapshots) and `save_named()` (`fcvm snapshot create`, asked through the control
socket of the process that owns the VM).

A snapshot of a running VM: both ends of the agent session quiesced (no frame in
flight), the VM paused, memory and state saved, each writable disk copied beside them
(the VMM has flushed it: it is paused), the VM resumed. Backends whose snapshot resets
the agent's connection (Firecracker's vsock) get a new session afterwards
(Machine.reconnect).

A VM given --map volumes takes image-cache prestart snapshots as any other (the
volumes are mounted only when its container starts, after that snapshot), but no
startup or named snapshot: by then the volumes' FUSE sessions (the guest kernel's
open files and node ids, the host server's table) are live in this VM and this
process, and cannot be carried into another.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fcvm.errors import GuestError, StateError
from fcvm.vmm.base import SnapshotFiles

if TYPE_CHECKING:
    from fcvm.machine.machine import Machine


def refuse_maps(machine: Machine) -> None:
    if machine.spec.maps:
        raise StateError(
            f"VM {machine.spec.name} has --map volumes, which a snapshot cannot carry "
            "(their FUSE sessions live in this VM and this process)",
            hint="snapshot a VM started without --map; clones can be given --map",
        )


async def snapshot(machine: Machine, files: SnapshotFiles) -> dict[str, str]:
    """Write a snapshot of the running VM (it goes on afterwards). Returns drive
    name -> disk file name in the snapshot's directory. One at a time per Machine."""
    vmm = machine.vmm
    assert vmm is not None
    if not vmm.capabilities.snapshot:
        raise vmm._unsupported("take snapshots")
    saved: dict[str, str] = {}
    source = machine.restore_source
    base = source.files if source is not None else None
    async with machine.snapshot_lock:
        await _quiesced_save(machine, files, base, saved)
    machine.timings.mark("snapshot-saved")
    return saved


async def _quiesced_save(
    machine: Machine, files: SnapshotFiles, base: SnapshotFiles | None, saved: dict[str, str]
) -> None:
    """Quiesce, pause, save, resume (the session is the Machine's current one: a
    snapshot before may have replaced it). Never left half done: cancelled meanwhile
    (`fcvm snapshot create` interrupted, its client gone), the save still finishes and
    the VM and its session resume before the cancellation goes on. (Resuming at once
    would not do: the save thread cannot be stopped, and QEMU pauses the VM again when
    its migration completes.)"""
    from fcvm.machine.machine import settled

    task = asyncio.ensure_future(_pause_save_resume(machine, files, base, saved))
    await settled(task)
    task.result()


async def _pause_save_resume(
    machine: Machine, files: SnapshotFiles, base: SnapshotFiles | None, saved: dict[str, str]
) -> None:
    from fcvm.machine import disks

    vmm, session = machine.vmm, machine.session
    assert vmm is not None

    def save() -> None:
        vmm.save_snapshot(files, base=base)
        for name, path in machine.disks.items():
            saved[name] = f"disk-{name}"
            machine.reflinked_disks[name] = disks.private_copy(
                path, files.state.parent / saved[name]
            )

    await session.quiesce()
    try:
        vmm.pause()
        try:
            await asyncio.to_thread(save)
        finally:
            vmm.resume()
    finally:
        if vmm.capabilities.agent_survives_snapshot:
            await session.resume()
        else:
            await machine.reconnect(session)


async def client_request(machine: Machine, op: str, msg: dict[str, Any]) -> dict[str, Any]:
    """A control-socket client's request, answered by the VM's owner."""
    from fcvm.session.control import RequestFailed

    if op == "snapshot":
        try:
            return await save_named(machine, str(msg.get("name", "")))
        except (GuestError, StateError) as exc:  # (FcvmErrors: their one line goes back)
            raise RequestFailed(exc.line()) from None
    raise RequestFailed(f"unknown request {op!r}")


async def save_named(machine: Machine, name: str) -> dict[str, Any]:
    """`fcvm snapshot create`: a named snapshot of the VM (it goes on running)."""
    from fcvm.errors import FcvmError
    from fcvm.snapshot import cache, store
    from fcvm.snapshot.layout import KIND_NAMED, SnapshotMeta, layout, validate_new_name
    from fcvm.vmm import registry

    try:
        refuse_maps(machine)
        snap = layout(validate_new_name(name))
        if snap.dir.exists():
            raise StateError(
                f"a snapshot named {name!r} exists already",
                hint="remove it with fcvm snapshots rm, or pick another name",
            )
        t0 = time.monotonic()
        # The image cache's least recently used entries make way if that is enough;
        # else the write is tried all the same (it was asked for by name).
        needed = cache.bytes_needed(machine.spec.mem_mib, machine.disks.values())
        await asyncio.to_thread(cache.make_room, needed)
        with store.writer(name) as writer:
            files = SnapshotFiles(writer.layout.memory, writer.layout.vmstate)
            disks = await snapshot(machine, files)
            spec = machine.spec
            meta = SnapshotMeta(
                name=name, kind=KIND_NAMED, vmm=spec.backend.backend,
                vmm_version=registry.load(spec.backend.backend).version(),
                accel=spec.backend.accel, mem_mib=spec.mem_mib, cpus=spec.vcpus,
                source_vm=machine.vm_id, machine=spec.hardware(), workload=machine.workload,
                disks=disks,
            )  # fmt: skip
            await asyncio.to_thread(writer.commit, meta)
    except FcvmError as exc:
        raise StateError(exc.line()) from None
    except OSError as exc:  # (a full disk while copying the VM's disks)
        raise StateError(f"cannot write the snapshot: {exc.strerror or exc}") from None
    return {"name": name, "seconds": round(time.monotonic() - t0, 3),
            "bytes": store.size_on_disk(layout(name).dir),
            "reflinked": all(machine.reflinked_disks.values())}  # fmt: skip
