"""QEMU backend: the `microvm` machine, under KVM when it can boot the guest, else TCG.

Measured choices (see ../shared/DESIGN.md): microvm with ACPI on (the Debian kernel
finds virtio-mmio devices through ACPI), PVH entry of the ELF vmlinux, virtio-blk
disks, virtio-rng (the TCG CPU has no RDRAND; without it podman waits for entropy),
tsc_early_khz (microvm has no HPET/PM timer; TSC calibration hung ~1 boot in 8).
The agent's byte stream is a virtio-serial port backed by a Unix socket that fcvm
connects to (this host has no vhost-vsock).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fcvm.errors import VmmUnavailable
from fcvm.vmm import process
from fcvm.vmm.base import Accel, Availability, Backend, Capabilities, VmConfig
from fcvm.vmm.process import ProcessVmm

if TYPE_CHECKING:
    from fcvm.vmm.kvm import KvmStatus

QEMU_BINARY = "qemu-system-x86_64"

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

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(accel=self.accel)

    def argv(self) -> list[str]:
        c = self.config
        cmdline = list(BASE_CMDLINE)
        khz = host_tsc_khz()
        if khz:
            cmdline.append(f"tsc_early_khz={khz}")
        cmdline += ["fcvm.transport=serial", f"fcvm.serial={AGENT_PORT_NAME}"]
        cmdline += list(c.cmdline_extra)
        console = c.console_log or (c.workdir / "console.log")
        argv = [
            qemu_binary(),
            "-M", "microvm,rtc=on",
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
        for drive in c.drives:
            ro = "on" if drive.read_only else "off"
            argv += [
                "-drive",
                f"id={drive.drive_id},file={drive.path},format=raw,if=none,readonly={ro}",
                "-device", f"virtio-blk-device,drive={drive.drive_id}",
            ]  # fmt: skip
        if c.net is not None:
            argv += [
                "-netdev", f"tap,id=net0,ifname={c.net.tap},script=no,downscript=no",
                "-device", f"virtio-net-device,netdev=net0,mac={c.net.mac}",
            ]  # fmt: skip
        return [*c.netns_exec, *argv]

    def start(self) -> None:
        self._proc = process.spawn(self.argv(), log_path=self.log_path)

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
        super().stop(timeout)


BACKEND = Backend(name="qemu", availability=availability, create=QemuVmm)
