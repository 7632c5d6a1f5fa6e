"""QEMU backend: the `microvm` machine, under KVM when it can boot the guest, else TCG.

Measured choices (see ../shared/DESIGN.md): microvm with ACPI on (the Debian kernel
finds virtio-mmio devices through ACPI), PVH entry of the ELF vmlinux, virtio-blk
disks, virtio-rng (the TCG CPU has no RDRAND; without it podman waits for entropy),
tsc_early_khz (microvm has no HPET/PM timer; TSC calibration hung ~1 boot in 8).
The agent's byte stream is a virtio-serial port backed by a Unix socket that fcvm
connects to (this host has no vhost-vsock); so is each --map volume's (MAP_CHANNELS
ports on every VM, used or not, so snapshots see one device layout).
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fcvm import log
from fcvm.agent.protocol import MAP_PORT_NAME
from fcvm.errors import VmmUnavailable
from fcvm.vmm import process, qemu_stream
from fcvm.vmm.base import (
    MAP_CHANNELS,
    Accel,
    Availability,
    Backend,
    Capabilities,
    SnapshotFiles,
    VmConfig,
)
from fcvm.vmm.endpoints import UnixConnector
from fcvm.vmm.process import ProcessVmm
from fcvm.vmm.qmp import Qmp

if TYPE_CHECKING:
    from fcvm.vmm.kvm import KvmStatus

QEMU_BINARY = "qemu-system-x86_64"
RAM_ID = "fcvm-ram"  # guest RAM's memory backend (and RAMBlock) id: snapshots key on it
SNAPSHOT_TIMEOUT = 120.0
_log = log.get("vmm.qemu")

AGENT_PORT_NAME = "fcvm.0"
BASE_CMDLINE = (
    "console=ttyS0",
    "quiet",
    "8250.nr_uarts=1",
    "no_timer_check",
    "tsc=reliable",
    "panic=-1",  # a guest panic ends QEMU at once (-no-reboot)
    # No boot-time self-tests of the kernel's crypto algorithms: ~0.2 s under TCG, and a
    # throwaway VM gains nothing from them.
    "cryptomgr.notests",
)


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC rate; TCG's guest TSC runs at it, so the guest needn't calibrate."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "constant_tsc" not in cpuinfo:
        return None
    for line in cpuinfo.splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return None


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise VmmUnavailable(f"{QEMU_BINARY} not found", hint="apt-get install qemu-system-x86")
    return path


def availability(kvm: KvmStatus) -> Availability:
    """QEMU runs wherever its binary is: with KVM when usable, else emulated (TCG)."""
    if shutil.which(QEMU_BINARY) is None:
        return Availability(
            False, f"{QEMU_BINARY} is not on PATH (install Debian's qemu-system-x86)"
        )
    if kvm.usable:
        return Availability(True, "QEMU with KVM", "kvm")
    return Availability(True, f"QEMU with TCG because {kvm.reason}", "tcg")


class QemuVmm(ProcessVmm):
    name = "qemu"

    def __init__(self, config: VmConfig, accel: Accel = "tcg") -> None:
        super().__init__(config)
        self.accel: Accel = accel
        self.agent_socket = config.workdir / "agent.sock"
        self.qmp_socket = config.workdir / "qmp.sock"
        self.log_path = config.workdir / "qemu.log"
        self._qmp: Qmp | None = None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(accel=self.accel, snapshot=True, restore=True)

    def argv(self, restore: SnapshotFiles | None = None) -> list[str]:
        """The command line; with restore, guest RAM is the snapshot's memory file mapped
        privately (share=off: its pages come from the page cache, shared by every VM
        restored from it, and writes stay in this process) and QEMU waits for the
        state stream (-incoming defer)."""
        c = self.config
        size = f"{c.mem_mib}M"
        if restore is None:
            memory = f"memory-backend-ram,id={RAM_ID},size={size}"
        else:
            memory = (f"memory-backend-file,id={RAM_ID},size={size},"
                      f"mem-path={restore.memory},share=off")  # fmt: skip
        cmdline = list(BASE_CMDLINE)
        khz = host_tsc_khz()
        if khz:
            cmdline.append(f"tsc_early_khz={khz}")
        cmdline += ["fcvm.transport=serial", f"fcvm.serial={AGENT_PORT_NAME}"]
        cmdline += list(c.cmdline_extra)
        console = c.console_log or (c.workdir / "console.log")
        argv = [
            qemu_binary(),
            "-M", f"microvm,rtc=on,memory-backend={RAM_ID}",
            "-object", memory,
            "-accel", self.accel,
            "-cpu", "host" if self.accel == "kvm" else "qemu64",
            "-smp", str(c.vcpus),
            "-m", str(c.mem_mib),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-name", f"fcvm-{c.vm_id}",
            "-kernel", str(c.kernel),
            "-initrd", str(c.initrd),
            "-append", " ".join(cmdline),
            "-chardev", f"file,id=console,path={console}",
            "-serial", "chardev:console",
            "-device", "virtio-rng-device",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
        ]  # fmt: skip
        for i in range(MAP_CHANNELS):
            argv += [
                "-chardev", f"socket,id=map{i},path={self.map_socket(i)},server=on,wait=off",
                "-device", f"virtserialport,chardev=map{i},name={MAP_PORT_NAME.format(i)}",
            ]  # fmt: skip
        for drive in c.drives:
            # A writable drive passes the guest's discards on as holes punched in its
            # file, so what a container deletes is given back to the host's disk. (The
            # virtio-blk device offers discard either way; only the backend changes,
            # so this does not touch the device state a snapshot holds.) A write the
            # host cannot make (its disk full) is an I/O error in the guest: QEMU's
            # default (werror=enospc) pauses the VM instead, and the run hung for good.
            mode = ("readonly=on" if drive.read_only
                    else "readonly=off,discard=unmap,werror=report,rerror=report")  # fmt: skip
            argv += [
                "-drive",
                f"id={drive.drive_id},file={drive.path},format=raw,if=none,{mode}",
                "-device", f"virtio-blk-device,drive={drive.drive_id}",
            ]  # fmt: skip
        if c.net is not None:
            argv += [
                "-netdev", f"tap,id=net0,ifname={c.net.tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=net0,mac={c.net.mac}",
            ]  # fmt: skip
        if restore is not None:
            argv += ["-incoming", "defer"]
        return [*c.netns_exec, *argv]

    def start(self) -> None:
        self._proc = process.spawn(self.argv(), log_path=self.log_path)

    def map_socket(self, index: int) -> Path:
        return self.config.workdir / f"map-{index}.sock"

    def map_endpoint(self, index: int) -> UnixConnector:
        return UnixConnector(self.map_socket(index))

    # -- snapshots ------------------------------------------------------------------

    def qmp(self) -> Qmp:
        if self._qmp is None:
            qmp = Qmp(self.qmp_socket)
            qmp.connect(time.monotonic() + 10.0)
            self._qmp = qmp
        return self._qmp

    def pause(self) -> None:
        self.qmp().execute("stop")

    def resume(self) -> None:
        self.qmp().execute("cont")

    def save_snapshot(self, files: SnapshotFiles, *, base: SnapshotFiles | None = None) -> None:
        """The paused VM's full migration stream, split on the fly (qemu_stream.py) into
        the memory file (guest RAM, sparse) and the state file (everything else). (base
        is not needed: QEMU 7.2 has no dirty-page diff of a whole save to offer.)"""
        qmp = self.qmp()
        # (bytes/s; the default throttles a local save to ~128 MiB/s)
        qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        r, w = os.pipe()
        stats: list[qemu_stream.SplitStats] = []
        failure: list[BaseException] = []
        mem_fd = os.open(files.memory, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

        def read_stream() -> None:
            try:
                with os.fdopen(r, "rb", buffering=1 << 20) as src, open(files.state, "wb") as out:
                    stats.append(qemu_stream.split(src, out, mem_fd, RAM_ID.encode()))
            except BaseException as exc:  # reported below, in the caller's thread
                failure.append(exc)

        reader = threading.Thread(target=read_stream, name="fcvm-qemu-snapshot", daemon=True)
        try:
            os.ftruncate(mem_fd, self.config.mem_mib << 20)
            reader.start()
            try:
                qmp.execute("getfd", {"fdname": "fcvm-save"}, fds=[w])
            finally:
                os.close(w)  # QEMU has its own copy: EOF comes when it closes it
            qmp.execute("migrate", {"uri": "fd:fcvm-save"})
            try:
                qmp.wait_migration(time.monotonic() + SNAPSHOT_TIMEOUT)
            except VmmUnavailable:
                # A reader that could not write (a full disk) fails QEMU's side with a
                # broken pipe: the reader's reason is the one to give.
                reader.join(5)
                _raise_write_failure(failure)
                raise
            reader.join(SNAPSHOT_TIMEOUT)
            _raise_write_failure(failure)
            if not stats:
                raise VmmUnavailable("the snapshot stream did not end")
            os.fsync(mem_fd)
        finally:
            os.close(mem_fd)
        _log.info("snapshot: %d pages, %d zero, state %d bytes",
                  stats[0].pages, stats[0].zero_pages, stats[0].state_bytes)  # fmt: skip

    def restore(self, files: SnapshotFiles) -> None:
        self._proc = process.spawn(self.argv(restore=files), log_path=self.log_path)
        try:
            qmp = self.qmp()
            fd = os.open(files.state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                qmp.execute("getfd", {"fdname": "fcvm-load"}, fds=[fd])
            finally:
                os.close(fd)
            qmp.execute("migrate-incoming", {"uri": "fd:fcvm-load"})
            qmp.wait_migration(time.monotonic() + SNAPSHOT_TIMEOUT)
        except VmmUnavailable as exc:
            code = self.poll()
            detail = self.failure_detail()
            raise VmmUnavailable(
                f"QEMU could not load the snapshot: {exc}"
                + (f" (QEMU exited with {code})" if code is not None else ""),
                hint=detail or None,
            ) from None

    async def open_agent_stream(
        self, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from fcvm.session.transport import connect_unix

        return await connect_unix(str(self.agent_socket), timeout)

    def log_files(self) -> list[Path | None]:
        return [self.log_path, self.config.console_log]

    def stop(self, timeout: float = 5.0) -> None:
        # The root disk is read-only and the container's state lives in guest RAM,
        # so there is nothing to flush: a plain kill is a correct shutdown.
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        super().stop(timeout)


BACKEND = Backend(
    name="qemu",
    availability=availability,
    create=QemuVmm,
    version=lambda: process.binary_version(QEMU_BINARY),
)


def _raise_write_failure(failure: list[BaseException]) -> None:
    """The snapshot reader's failure, if any: OSErrors (ENOSPC, EIO) as one line."""
    if not failure:
        return
    exc = failure[0]
    if isinstance(exc, OSError):
        raise VmmUnavailable(f"cannot write the snapshot: {exc.strerror or exc}") from None
    raise exc
