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
from typing import Any

from fcvm.errors import UsageError
from fcvm.net.publish import PortForward
from fcvm.vmm.base import MAP_CHANNELS, Drive
from fcvm.vmm.select import Choice
from fcvm.volumes.spec import VolumeMap

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
    # host directories served to the guest (machine/volumes.py), map i on channel i
    maps: tuple[VolumeMap, ...] = ()

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
        if len(self.maps) > MAP_CHANNELS:
            raise UsageError(f"at most {MAP_CHANNELS} --map volumes per VM")

    def drive_names(self) -> tuple[str, ...]:
        return (ROOT_DRIVE, *(d.name for d in self.drives))

    def hardware(self) -> dict[str, Any]:
        """What a snapshot of this VM needs to be restored by another process: every
        field but the name, the network's addresses and published ports (a clone gets
        its own), as JSON."""
        return {
            "backend": [self.backend.backend, self.backend.accel],
            "kernel": str(self.kernel), "initrd": str(self.initrd), "rootfs": str(self.rootfs),
            "vcpus": self.vcpus, "mem_mib": self.mem_mib, "network": self.network,
            "drives": [{"name": d.name, "path": str(d.path) if d.path else None,
                        "read_only": d.read_only, "blank_size": d.blank_size}
                       for d in self.drives],
            "image": self.image, "cmdline_extra": list(self.cmdline_extra),
        }  # fmt: skip

    @classmethod
    def from_hardware(
        cls, hw: dict[str, Any], *, name: str, network: str | None = None,
        publish: tuple[PortForward, ...] = (), maps: tuple[VolumeMap, ...] = (),
    ) -> MachineSpec:  # fmt: skip
        """The spec of a VM restored from a snapshot of `hardware()`; UsageError if that
        is not one, or its kernel, initrd or root disk are gone (`fcvm setup` rebuilt them
        and pruned the old ones)."""
        try:
            backend, accel = hw["backend"]
            spec = cls(
                name=name,
                backend=Choice(str(backend), accel, "as the snapshot was taken"),
                kernel=Path(hw["kernel"]), initrd=Path(hw["initrd"]), rootfs=Path(hw["rootfs"]),
                vcpus=int(hw["vcpus"]), mem_mib=int(hw["mem_mib"]),
                network=network or hw.get("network"), publish=publish,
                drives=tuple(DriveSpec(d["name"], Path(d["path"]) if d.get("path") else None,
                                       bool(d["read_only"]), int(d.get("blank_size", 0)))
                             for d in hw["drives"]),
                image=str(hw.get("image", "")),
                cmdline_extra=tuple(str(a) for a in hw.get("cmdline_extra", ())),
                maps=maps,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"the snapshot does not describe its VM ({exc})") from None
        for path in (spec.kernel, spec.initrd, spec.rootfs,
                     *(d.path for d in spec.drives if d.read_only and d.path)):  # fmt: skip
            if not path.exists():
                raise UsageError(f"the snapshot needs {path}, which is gone",
                                 hint="it was taken with older guest assets or images")  # fmt: skip
        return spec

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
