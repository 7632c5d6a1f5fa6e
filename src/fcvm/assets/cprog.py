"""Small C programs fcvm puts in the guest, built statically with the host's gcc.

They run where Python would be too slow under emulation, or where the container's
image has no libc to offer (the gate runs inside any container). The rootfs key
includes their sources and flags, so changing one rebuilds the rootfs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fcvm.errors import FcvmError

CFLAGS = ("-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror")
_ASSETS = Path(__file__).parent / "data"
_VOLUMES = Path(__file__).parent.parent / "volumes" / "data"


@dataclass(frozen=True)
class Program:
    guest_path: str  # where it goes in the root filesystem
    source: Path
    extra_flags: tuple[str, ...] = ()


PROGRAMS = (
    Program("usr/lib/fcvm/gate", _ASSETS / "gate.c"),
    # The guest half of --map (volumes/): two threads, one per direction.
    Program("usr/lib/fcvm/fcvm-fuse-relay", _VOLUMES / "fcvm-fuse-relay.c", ("-pthread",)),
)


def sources() -> list[str]:
    """What the built programs depend on (sources and flags), for the rootfs key."""
    return [f"{' '.join((*CFLAGS, *p.extra_flags))}\n{p.source.read_text()}" for p in PROGRAMS]


def build_static(source: Path, out: Path, extra_flags: tuple[str, ...] = ()) -> None:
    """gcc -static source -> out, atomically (FcvmError in one line if it cannot)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FcvmError(f"gcc is needed to build {source.name}",
                        hint="apt-get install gcc libc6-dev")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fcvm-cc-", dir=out.parent) as tmp:
        exe = Path(tmp, out.name)
        proc = subprocess.run([gcc, *CFLAGS, *extra_flags, "-o", str(exe), str(source)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            static_libc = any("-lc" in line or "crt1.o" in line for line in lines)
            why = "static libc is missing" if static_libc else (lines or ["gcc failed"])[-1]
            raise FcvmError(f"building {source.name} failed: {why}",
                            hint="apt-get install gcc libc6-dev")  # fmt: skip
        exe.chmod(0o755)
        os.replace(exe, out)


def install(root: Path) -> None:
    """Build every guest program into the root filesystem tree at root."""
    for program in PROGRAMS:
        build_static(program.source, root / program.guest_path, program.extra_flags)
