"""The guest half of a volume: fcvm-fuse-relay, a small static C program built from
data/fcvm-fuse-relay.c with the host's gcc (the rootfs build calls build_relay and
keys its asset cache on relay_digest()).

    fcvm-fuse-relay [--ro] MOUNTPOINT STREAM_FD

It mounts MOUNTPOINT (fuse.fcvm, nosuid,nodev, default_permissions,allow_other),
writes the byte b"R" to stdout and closes it once the mount exists, then relays raw
FUSE messages between /dev/fuse and STREAM_FD until either side ends; see the C file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from fcvm.errors import FcvmError

READY_BYTE = b"R"
RELAY_NAME = "fcvm-fuse-relay"
CFLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread")


def relay_source() -> bytes:
    return resources.files("fcvm.volumes").joinpath("data", f"{RELAY_NAME}.c").read_bytes()


def relay_digest() -> str:
    """sha256 of the C source and the compiler flags: what the built binary depends on."""
    h = hashlib.sha256(relay_source())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()


def build_relay(out: Path) -> None:
    """Compile the relay into `out` (atomically: a temp file renamed over it)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FcvmError(
            "cannot build fcvm-fuse-relay: gcc is not installed",
            hint="apt-get install gcc libc6-dev",
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fcvm-relay-") as tmp:
        src = Path(tmp, f"{RELAY_NAME}.c")
        src.write_bytes(relay_source())
        exe = Path(tmp, RELAY_NAME)
        proc = subprocess.run(
            [gcc, *CFLAGS, "-o", str(exe), str(src)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            detail = proc.stderr.strip().splitlines()
            static_libc = any("-lc" in line or "crt1.o" in line for line in detail)
            raise FcvmError(
                "cannot build fcvm-fuse-relay: "
                + ("static libc is missing" if static_libc else (detail or ["gcc failed"])[-1]),
                hint="apt-get install libc6-dev" if static_libc else None,
            )
        staged = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.copyfile(exe, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, out)
