"""The one small interface every VMM backend implements.

The rest of fcvm never knows whether Firecracker or QEMU runs the guest: it builds a
VmConfig, calls start(), opens the agent stream, and finally stop(). Snapshot
support is added per backend behind the same interface.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Drive:
    """A raw disk image given to the guest as a virtio block device, in order."""

    drive_id: str
    path: Path
    read_only: bool = True
    is_root: bool = False


@dataclass(frozen=True)
class NetIface:
    """A TAP device (already created, in the VMM's network namespace)."""

    tap: str
    mac: str


@dataclass(frozen=True)
class VmConfig:
    vm_id: str
    workdir: Path  # private directory for sockets and logs; removed at teardown
    kernel: Path  # ELF vmlinux (PVH entry) - both backends boot it
    initrd: Path
    vcpus: int
    mem_mib: int
    drives: tuple[Drive, ...]
    cmdline_extra: tuple[str, ...] = ()  # fcvm.* parameters for the guest agent
    net: NetIface | None = None
    # Command prefix that runs the VMM inside the VM's network namespace
    # (e.g. ["nsenter", "--net=/run/netns/x", "--"]); empty = host namespace.
    netns_exec: tuple[str, ...] = ()
    console_log: Path | None = None  # guest serial console goes here
    extra: dict[str, str] = field(default_factory=dict)


class Vmm(ABC):
    """A running (or about to run) microVM."""

    name: str = "?"

    def __init__(self, config: VmConfig) -> None:
        self.config = config

    @abstractmethod
    def start(self) -> None:
        """Launch the VMM process and boot the guest. Returns once it is booting."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """PID of the VMM process, once started."""

    @abstractmethod
    async def open_agent_stream(
        self, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the guest agent's byte stream (vsock or virtio-serial)."""

    @abstractmethod
    def poll(self) -> int | None:
        """Exit status of the VMM process if it has ended, else None."""

    @abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """End the VM (gracefully if it can, else kill) and reap the VMM process.

        Idempotent; never raises for a VMM that is already gone."""
