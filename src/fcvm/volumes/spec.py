"""`--map HOST:GUEST[:ro]`: host directories to show inside the container.

Repeatable and comma-separated (`--map /a:/x,/b:/y:ro`). Everything is checked
before anything is created, so a bad spec is a UsageError (exit 125) naming the item.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fcvm.errors import UsageError

# Where the container's kernel filesystems are (and what they are): a map over them, or
# inside them, hides what ps, mount, the shell's /dev/null and the like rely on.
KERNEL_DIRS = {"/proc": "procfs", "/sys": "sysfs", "/dev": "devices"}


@dataclass(frozen=True)
class VolumeMap:
    host: Path  # absolute, symlinks resolved, an existing directory
    guest: str  # absolute, normalised, never "/"
    read_only: bool = False


def parse_map(item: str) -> VolumeMap:
    """One HOST:GUEST[:ro] item. Paths containing ':' or ',' cannot be mapped."""
    parts = item.split(":")
    if len(parts) == 3:
        if parts[2] not in ("ro", "rw"):
            raise UsageError(f"malformed --map {item!r}: the option must be 'ro' or 'rw'")
        read_only = parts[2] == "ro"
    elif len(parts) == 2:
        read_only = False
    else:
        raise UsageError(f"malformed --map {item!r}: expected HOST:GUEST[:ro]")
    host_s, guest_s = parts[0], parts[1]
    if not host_s:
        raise UsageError(f"malformed --map {item!r}: empty host path")
    if not guest_s:
        raise UsageError(f"malformed --map {item!r}: empty guest path")
    if "\0" in item:
        raise UsageError(f"malformed --map {item!r}: NUL byte in a path")
    host = Path(host_s).expanduser()
    try:
        real = host.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise UsageError(f"--map {item!r}: host path {host_s!r} does not exist") from e
    if not real.is_dir():
        raise UsageError(f"--map {item!r}: host path {host_s!r} is not a directory")
    if not os.access(real, os.X_OK):
        raise UsageError(f"--map {item!r}: host path {host_s!r} is not searchable")
    if not guest_s.startswith("/"):
        raise UsageError(f"--map {item!r}: guest path {guest_s!r} must be absolute")
    # normpath keeps a leading "//"; collapse it so "//x" and "/x" are one path.
    guest = "/" + posixpath.normpath(guest_s).lstrip("/")
    if guest == "/":
        raise UsageError(f"--map {item!r}: cannot map over the guest's root directory")
    if any(part == ".." for part in guest_s.split("/")):
        # "/a/../b" would normalise to "/b": refuse rather than guess what was meant.
        raise UsageError(f"--map {item!r}: guest path {guest_s!r} must not contain '..'")
    for kernel_fs in KERNEL_DIRS:
        if guest == kernel_fs or guest.startswith(kernel_fs + "/"):
            raise UsageError(
                f"--map {item!r}: cannot map over {kernel_fs} (the container's "
                f"{KERNEL_DIRS[kernel_fs]}: its programs would break)"
            )
    return VolumeMap(host=real, guest=guest, read_only=read_only)


def parse_maps(values: Iterable[str]) -> tuple[VolumeMap, ...]:
    """Every --map value (each possibly comma-separated), without duplicate guest paths,
    outer guest paths first (as podman orders mounts): mounted in this order, a map
    inside another's guest path (/data/in within /data) is on top whichever way round
    they were given."""
    out: list[VolumeMap] = []
    seen: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            if not item:
                raise UsageError(f"malformed --map {value!r}: empty entry")
            vm = parse_map(item)
            if vm.guest in seen:
                raise UsageError(
                    f"--map {item!r}: guest path {vm.guest!r} is already mapped "
                    f"by {seen[vm.guest]!r}"
                )
            seen[vm.guest] = item
            out.append(vm)
    return tuple(sorted(out, key=lambda m: m.guest.count("/")))  # (stable: else as given)
