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
    """A disk for the guest; `name` is how code refers to it (never by letter).

    Read-only: `path` is attached as it is. Writable: the VM gets its own copy of
    `path`, or with no path a new empty ext4 of `blank_size` bytes (machine/disks.py)."""

    name: str
    path: Path | None = None
    read_only: bool = True
    blank_size: int = 0

    def __post_init__(self) -> None:
        if self.read_only and self.path is None:
            raise UsageError(f"read-only drive {self.name!r} needs an image")
        if not self.read_only and self.path is None and self.blank_size <= 0:
            raise UsageError(f"writable drive {self.name!r} needs an image or a size")


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

    def writable_drives(self) -> tuple[DriveSpec, ...]:
        return tuple(d for d in self.drives if not d.read_only)

    def vmm_drives(self, private: dict[str, Path] | None = None) -> tuple[Drive, ...]:
        """The drives as the VMM attaches them, root first; writable ones at their
        private copies (private: name -> path)."""
        root = Drive(ROOT_DRIVE, self.rootfs, read_only=True, is_root=True)
        out = [root]
        for d in self.drives:
            path = (private or {}).get(d.name) if not d.read_only else d.path
            if path is None:
                raise UsageError(f"drive {d.name!r} has no private copy yet")
            out.append(Drive(d.name, path, read_only=d.read_only))
        return tuple(out)
