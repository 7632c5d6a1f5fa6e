"""The one small interface every VMM backend implements, and what a backend module exports.

The rest of fcvm never knows whether Firecracker or QEMU runs the guest: it builds a
VmConfig, asks the backend for a Vmm, calls start() (or restore()), opens the agent
stream, and finally stop(). What a backend can do beyond booting (pausing, saving a
snapshot, starting from one) it declares in `Capabilities`; callers ask before they
use it, and a backend that cannot raises `NotSupported` with one line.

A backend module (vmm/qemu.py, vmm/firecracker.py) exports ``BACKEND``, a `Backend`:
its name, how to tell whether it can run here (`availability`), and how to make a Vmm.
vmm/registry.py lists the modules; nothing else names them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fcvm.errors import VmmUnavailable

if TYPE_CHECKING:
    import asyncio

    from fcvm.vmm.endpoints import StreamEndpoint
    from fcvm.vmm.kvm import KvmStatus

Accel = Literal["kvm", "tcg"]

# Every VM has this many extra guest<->host streams, used or not, for --map volumes:
# a fixed set keeps the device layout (what a snapshot records) the same whatever a
# run maps. Their guest names and ports are in agent/protocol.py.
MAP_CHANNELS = 8


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


@dataclass(frozen=True)
class Capabilities:
    """What a running backend can do beyond booting a guest."""

    accel: Accel  # how the guest's CPU runs
    snapshot: bool = False  # pause() / resume() / save a snapshot
    restore: bool = False  # start from a saved snapshot instead of booting
    # Whether the agent's connection survives taking a snapshot (Firecracker resets
    # vsock connections at every snapshot/create: the host then connects anew).
    agent_survives_snapshot: bool = True


class NotSupported(VmmUnavailable):
    """The backend cannot do what was asked (see its Capabilities)."""


@dataclass(frozen=True)
class SnapshotFiles:
    """Where a snapshot's guest memory and VMM state are (or are to be) written."""

    memory: Path  # guest memory, its regions end to end (sparse: holes are zero pages)
    state: Path  # the VMM's own device and vCPU state
    # restore only: take the memory from this userfaultfd page server's socket
    # (`fcvm snapshot serve`) instead of mapping the file (Firecracker's Uffd backend).
    page_server: Path | None = None


class Vmm(ABC):
    """A running (or about to run) microVM."""

    name: str = "?"

    def __init__(self, config: VmConfig) -> None:
        self.config = config

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this VMM can do (snapshot, restore, the accelerator in use)."""

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

    def failure_detail(self) -> str:
        """What the VMM and the guest said last, for the one-line error when it dies."""
        return ""

    def map_endpoint(self, index: int) -> StreamEndpoint:
        """The host end of extra stream `index` (0..MAP_CHANNELS-1), for a --map volume.
        Made before the guest is asked to use it; its open() blocks until connected."""
        raise self._unsupported("carry --map volumes")

    # -- snapshots (Capabilities.snapshot / .restore say whether these work) ----------

    def pause(self) -> None:
        raise self._unsupported("pause a VM")

    def resume(self) -> None:
        """Run a paused (or just restored) VM; a no-op for a running one."""
        raise self._unsupported("resume a VM")

    def save_snapshot(self, files: SnapshotFiles, *, base: SnapshotFiles | None = None) -> None:
        """Write the paused VM's memory and state; the VM stays paused. With base (the
        snapshot this VM was restored from), a backend that tracks dirty pages may write
        only what changed since and merge it onto a copy of base's memory (Firecracker's
        Diff snapshots); the result is always a complete memory file."""
        raise self._unsupported("take snapshots")

    def restore(self, files: SnapshotFiles) -> None:
        """Instead of start(): launch the VMM with the snapshot's memory mapped privately
        (the snapshot's files are never written) and its state loaded. Returns with the
        VM paused, so the caller can connect to the agent first; then resume(). (Where
        the agent cannot be reached while paused - Firecracker's vsock - open_agent_stream
        resumes the VM itself, and resume() is then a no-op.)"""
        raise self._unsupported("restore snapshots")

    def _unsupported(self, what: str) -> NotSupported:
        return NotSupported(f"the {self.name} backend cannot {what} here")


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run guests on this host, with what, and why (not)."""

    usable: bool
    reason: str
    accel: Accel = "kvm"


@dataclass(frozen=True)
class Backend:
    """What a backend module exports as BACKEND (see vmm/registry.py)."""

    name: str
    availability: Callable[[KvmStatus], Availability]
    create: Callable[[VmConfig, Accel], Vmm]
    # The VMM's version, e.g. "QEMU 7.2.22": snapshots record it (a state file is
    # only loaded by the VMM version that wrote it).
    version: Callable[[], str] = lambda: ""
