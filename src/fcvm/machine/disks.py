"""The VM's writable disks: private to the VM, made in milliseconds, gone with it.

A writable drive is never attached as the file it names: the Machine gives each VM its
own copy in the VM's directory - a new empty ext4 (`blank`: the container storage
disk), a copy of the drive's image, or, restoring a snapshot, a copy of the snapshot's
disk. Copies are reflinks where the filesystem can (btrfs, XFS: instant, blocks shared
until written), else sparse copies of the data extents only. The directory (and the
disk) goes at teardown, or with `fcvm gc` after kill -9.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from fcvm import log
from fcvm.errors import FcvmError

logger = log.get("machine.disks")


def make_blank(path: Path, size: int, label: str = "fcvm-storage") -> None:
    """A sparse file of `size` bytes holding an empty ext4 (no journal: the VM is
    thrown away; inode tables not zeroed: the guest mounts with noinit_itable). About
    10 ms at 8 GiB or 100 GiB alike."""
    with open(path, "wb") as f:
        f.truncate(size)
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-m", "0", "-b", "4096", "-O", "^has_journal",
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
            str(path)]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise FcvmError("mkfs.ext4 is not installed", hint="apt-get install e2fsprogs") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise FcvmError(f"cannot make the VM's disk: {lines[-1] if lines else proc.returncode}")


SLOW_COPY_BYTES = 256 << 20  # data worth a word when it is copied rather than reflinked


def private_copy(source: Path, dest: Path) -> bool:
    """dest = the VM's own copy of source: a reflink, else a sparse copy; True if it was
    a reflink. A sparse copy of much data is logged (info) with why it is slower."""
    from fcvm.snapshot.store import copy_disk

    try:
        reflinked = copy_disk(source, dest)
    except OSError as exc:
        raise FcvmError(f"cannot copy the disk {source}: {exc.strerror or exc}") from None
    if not reflinked and dest.stat().st_blocks * 512 > SLOW_COPY_BYTES:
        logger.info("%s is not on a filesystem with reflinks (btrfs, XFS): its disk was "
                    "copied extent by extent, which is slower", source.parent)  # fmt: skip
    return reflinked
