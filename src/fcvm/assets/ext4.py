"""Packing a directory tree into a read-only ext4 image with `mkfs.ext4 -d`.

Both the guest root filesystem and the per-image container stores are built this
way: e2fsprogs (>= 1.43) copies ownership, modes, xattrs, device nodes (overlay
whiteouts) and hard links, so no loop mount or root-owned mount step is needed.
Images get no journal (the guest mounts them read-only) and an inode table sized
to the tree.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fcvm import children
from fcvm.errors import FcvmError

MIB = 1 << 20
E2FSPROGS = "apt-get install e2fsprogs"


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes rounded to 4 KiB blocks, number of inodes) of a directory tree."""
    total, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            count += 1
            total += (st.st_size + 4095) // 4096 * 4096
    return total, count


def pack(root: Path, out: Path, *, label: str, growth: float, slack_mib: int) -> int:
    """Write root into the ext4 image out (replaced), sized used*growth + slack;
    retried once at double the size if the estimate was short. Returns the size.
    FcvmError with mkfs's most telling line on failure."""
    used, inodes = tree_size(root)
    size = int(used * growth) + slack_mib * MIB
    for attempt in (1, 2):
        size = (size + MIB - 1) // MIB * MIB
        out.unlink(missing_ok=True)
        with out.open("wb") as f:
            f.truncate(size)
        argv = [
            "mkfs.ext4", "-q", "-F", "-L", label, "-m", "0", "-b", "4096",
            "-O", "^has_journal", "-N", str(inodes + inodes // 5 + 256),
            "-E", "root_owner=0:0,lazy_itable_init=0,nodiscard",
            "-d", str(root), str(out),
        ]  # fmt: skip
        try:
            proc = children.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise FcvmError(
                "mkfs.ext4 is not installed", hint="apt-get install e2fsprogs"
            ) from None
        if proc.returncode == 0:
            return size
        if attempt == 2:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise FcvmError(f"mkfs.ext4 failed: {lines[-1] if lines else proc.returncode}")
        size *= 2
    raise AssertionError("unreachable")
