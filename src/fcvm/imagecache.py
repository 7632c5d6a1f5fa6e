"""The image cache for container runs: which snapshot a run may start from, and writing
the snapshots the first run of a key leaves for later ones.

Two kinds of entry (snapshot/cache.py stores them):

prestart  taken right after the container was prepared: the image in podman's storage,
          the container created and running, held at fcvm's gate - every step of
          `podman run` done except exec'ing the user's process. Its key is what the
          guest has seen by then (see `keys_for`); a run restored from it only tells
          the gate its command, env and stdio.
startup   with --health-check: taken when the check first passes, the user's process
          running and healthy. Its key adds the command, env, TTY/stdin and the check,
          which that process was started with.

What differs per run and is applied after a restore rather than keyed: the VM's name
and hostname, MAC and addresses, published ports (host side), the clock and the
entropy pool (Machine's identity step), env/command/proxies (given to the gate at
start, prestart only).
"""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fcvm import log
from fcvm.errors import FcvmError
from fcvm.machine import RestoreSource
from fcvm.snapshot import cache
from fcvm.snapshot.layout import KIND_PRESTART, KIND_STARTUP, SnapshotMeta
from fcvm.vmm.base import SnapshotFiles

if TYPE_CHECKING:
    from fcvm.images import GuestImage
    from fcvm.machine import Machine, MachineSpec
    from fcvm.plan import RunPlan

logger = log.get("imagecache")

KEY_VERSION = 2  # 2: every VM has the --map streams (vmm/base.py MAP_CHANNELS)


@dataclass(frozen=True)
class Keys:
    prestart: str | None  # None: no cache for this run (reason says why)
    startup: str | None
    parts: dict[str, Any]
    expect: dict[str, str]  # what a restorable entry must have recorded
    reason: str = ""


def keys_for(plan: RunPlan, spec: MachineSpec, image: GuestImage) -> Keys:
    """The run's keys, from everything the guest sees before the snapshot."""
    from fcvm.vmm import registry

    if not plan.snapshot or cache.disabled():
        return Keys(None, None, {}, {}, "snapshots are off for this run")
    if image.pull:
        return Keys(None, None, {}, {}, "the image is pulled in the guest (its ID is unknown)")
    backend = registry.load(spec.backend.backend)
    version = backend.version()
    cpu = "qemu64" if spec.backend.accel == "tcg" else _host_cpu()
    store = image.store
    parts: dict[str, Any] = {
        "v": KEY_VERSION,
        # Content-addressed names: a rebuilt kernel, initrd or rootfs has another.
        "assets": [spec.kernel.name, spec.initrd.name, spec.rootfs.name],
        "image": {
            "store": store.path.name if store else None,
            "id": store.image_id if store else None,
            "archive": _archive_identity(image),
        },
        "drives": list(spec.drive_names()),
        "vcpus": spec.vcpus,
        "mem_mib": spec.mem_mib,
        "backend": spec.backend.backend,
        "accel": spec.backend.accel,
        "vmm_version": version,
        "cpu": cpu,
        "network": spec.network,
        "ipv6": _host_ipv6() if spec.network == "rootless" else False,
        "privileged": plan.privileged,
        "disk_size": plan.disk_size,
    }
    prestart = cache.key_of(parts)
    startup = None
    # (No startup snapshot with --map: its volumes would be live in it; snapshots.py.)
    if plan.health_check and not plan.maps:
        startup = cache.key_of({**parts, "startup": {
            "command": list(plan.command), "env": [list(kv) for kv in plan.env],
            "tty": plan.tty, "interactive": plan.interactive,
            "health_check": plan.health_check, "proxies": _proxies(),
        }})  # fmt: skip
    expect = {"vmm": spec.backend.backend, "vmm_version": version, "accel": spec.backend.accel}
    return Keys(prestart, startup, parts, expect)


def lookup(keys: Keys) -> cache.Entry | None:
    """The best entry to start from: a startup snapshot, else a prestart one."""
    for kind, key in ((KIND_STARTUP, keys.startup), (KIND_PRESTART, keys.prestart)):
        if key is not None:
            entry = cache.lookup(kind, key, keys.expect)
            if entry is not None:
                logger.info("restoring %s snapshot %s", kind, entry.layout.name)
                return entry
    return None


def restore_source(entry: cache.Entry) -> RestoreSource:
    snap = entry.layout
    return RestoreSource(
        name=snap.name,
        files=SnapshotFiles(snap.memory, snap.vmstate),
        disks={drive: snap.dir / name for drive, name in entry.meta.disks.items()},
    )


def forget(entry: cache.Entry, why: str) -> None:
    """An entry that failed to restore: never try it again."""
    from fcvm.snapshot import store
    from fcvm.snapshot.layout import SnapshotError

    entry.lease.release()
    logger.info("snapshot %s did not restore (%s); removed, booting cold", entry.layout.name, why)
    try:
        store.remove(entry.layout.name)
    except SnapshotError as exc:
        logger.info("could not remove %s: %s", entry.layout.name, exc)


async def write(machine: Machine, keys: Keys, kind: str, workload: dict[str, Any]) -> bool:
    """Snapshot the running VM into the cache as key's `kind` entry (unless another run
    is writing it); True if written. The VM goes on either way: a snapshot that cannot
    be written (a full disk) is a warning, its remains removed, and the next run of the
    key boots cold and tries again."""
    try:
        return await _write(machine, keys, kind, workload)
    except (FcvmError, OSError) as exc:
        why = exc.line() if isinstance(exc, FcvmError) else (exc.strerror or str(exc))
        logger.warning("no %s snapshot for the image cache: %s (the run goes on)", kind, why)
        return False


async def _write(machine: Machine, keys: Keys, kind: str, workload: dict[str, Any]) -> bool:
    key = keys.startup if kind == KIND_STARTUP else keys.prestart
    assert key is not None
    spec = machine.spec
    with cache.creator(key) as writer:
        if writer is None:
            return False
        # Room first (least recently used entries make way), so that a nearly full disk
        # costs a line, not a paused VM and a write that fails; and the cache's bound
        # read, so that a malformed one is said before anything is written.
        limit = cache.limit_bytes()
        needed = cache.bytes_needed(spec.mem_mib, machine.disks.values())
        room, free = await asyncio.to_thread(cache.make_room, needed)
        if not room:
            logger.warning("no %s snapshot for the image cache: %d MiB free where snapshots "
                           "go, up to %d MiB needed (the run goes on)", kind, free >> 20,
                           needed >> 20)  # fmt: skip
            return False
        snap = writer.layout
        disks = await machine.snapshot(SnapshotFiles(snap.memory, snap.vmstate))
        meta = SnapshotMeta(
            name=snap.name, kind=kind, plan_key=key, key_parts=keys.parts,
            vmm=spec.backend.backend, vmm_version=keys.expect["vmm_version"],
            accel=spec.backend.accel, mem_mib=spec.mem_mib, cpus=spec.vcpus,
            source_vm=machine.vm_id, machine={"drives": list(spec.drive_names()),
                                              "network": spec.network},
            workload=workload, disks=disks,
        )  # fmt: skip
        await asyncio.to_thread(writer.commit, meta)
    logger.info("wrote %s snapshot %s", kind, snap.name)
    removed = await asyncio.to_thread(cache.enforce_limit, limit)
    if snap.name in removed:
        logger.warning("the image cache's bound (%d MiB) is smaller than one snapshot: "
                       "nothing is cached (raise FCVM_SNAPSHOT_CACHE_MAX)",
                       limit >> 20)  # fmt: skip
    return True


def _archive_identity(image: GuestImage) -> str | None:
    if image.archive is None:
        return None
    from fcvm.images import archive_store_key

    try:
        return archive_store_key(image.archive)
    except OSError:
        return None


def _host_cpu() -> str:
    """The host CPU model (KVM guests see it: `-cpu host`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _host_ipv6() -> bool:
    from fcvm.net.rootless import _host_has_ipv6

    return _host_has_ipv6()


def _proxies() -> list[str]:
    """The host's proxy settings: a startup snapshot's process was given them."""
    from fcvm.net import proxy_env

    return sorted(f"{k}={v}" for k, v in proxy_env(dict(os.environ)).items())
