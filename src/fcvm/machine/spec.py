"""MachineSpec: everything that describes one VM before it exists.

Drives are named, and their guest device is assigned here and nowhere else: the root
disk is /dev/vda and the others follow in the order given (both backends attach
virtio-blk devices in that order, and the guest kernel names them in probe order).
Code that tells the guest where a disk is asks `spec.device(name)`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from fcvm.errors import UsageError
from fcvm.net.publish import PortForward
from fcvm.vmm.base import Drive
from fcvm.vmm.select import Choice

ROOT_DRIVE = "root"
NETWORK_MODES = ("rootless", "bridged")


@dataclass(frozen=True)
class DriveSpec:
    """A disk image for the guest; `name` is how code refers to it (never by letter)."""

    name: str
    path: Path
    read_only: bool = True


@dataclass(frozen=True)
class MachineSpec:
    name: str  # the VM's name: unique among live VMs, the guest's hostname
    backend: Choice
    kernel: Path
    initrd: Path
    rootfs: Path
    vcpus: int = 1
    mem_mib: int = 1024
    network: str | None = "rootless"  # rootless | bridged | None (no network)
    publish: tuple[PortForward, ...] = ()
    drives: tuple[DriveSpec, ...] = ()  # after the root disk, in guest order
    image: str = ""  # what `fcvm ls` shows as IMAGE
    cmdline_extra: tuple[str, ...] = ()  # more fcvm.* kernel parameters for the agent
    labels: dict[str, str] = field(default_factory=dict)  # kept in the VM's record

    def __post_init__(self) -> None:
        names = [ROOT_DRIVE, *(d.name for d in self.drives)]
        if len(set(names)) != len(names):
            raise UsageError(f"drive names must be unique: {', '.join(names)}")
        if len(names) > len(string.ascii_lowercase):
            raise UsageError(f"at most {len(string.ascii_lowercase)} drives")
        if self.network is not None and self.network not in NETWORK_MODES:
            raise UsageError(
                f"unknown network mode {self.network!r} (use {' or '.join(NETWORK_MODES)})"
            )
        if self.publish and self.network is None:
            raise UsageError("publishing ports needs a network")

    def drive_names(self) -> tuple[str, ...]:
        return (ROOT_DRIVE, *(d.name for d in self.drives))

    def device(self, name: str) -> str:
        """The guest's block device for drive `name`: the one place letters are given."""
        try:
            index = self.drive_names().index(name)
        except ValueError:
            raise KeyError(f"no drive named {name!r}") from None
        return f"/dev/vd{string.ascii_lowercase[index]}"

    def vmm_drives(self) -> tuple[Drive, ...]:
        """The drives as the VMM attaches them, root first."""
        root = Drive(ROOT_DRIVE, self.rootfs, read_only=True, is_root=True)
        return (root, *(Drive(d.name, d.path, read_only=d.read_only) for d in self.drives))
