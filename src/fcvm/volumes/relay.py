"""The guest half of a volume: fcvm-fuse-relay, a small static C program
(data/fcvm-fuse-relay.c) that setup builds into the root filesystem with the guest's
other C programs (assets/cprog.py).

    fcvm-fuse-relay [--ro] [--mntns PATH] MOUNTPOINT STREAM_FD

It mounts MOUNTPOINT (fuse.fcvm, nosuid,nodev, default_permissions,allow_other) -
inside the mount namespace PATH names, when given, creating MOUNTPOINT there - writes
the byte b"R" to stdout and closes it once the mount exists, then relays raw FUSE
messages between /dev/fuse and STREAM_FD until either side ends; see the C file.
"""

from __future__ import annotations

from pathlib import Path

from fcvm.assets import cprog

READY_BYTE = b"R"
RELAY_NAME = "fcvm-fuse-relay"
GUEST_PATH = "/usr/lib/fcvm/" + RELAY_NAME


def _program() -> cprog.Program:
    return next(p for p in cprog.PROGRAMS if p.guest_path == GUEST_PATH.lstrip("/"))


def build_relay(out: Path) -> None:
    """Compile the relay into `out` (for host tests and benchmarks; atomic)."""
    program = _program()
    cprog.build_static(program.source, Path(out), program.extra_flags)
