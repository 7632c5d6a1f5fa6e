"""Small C programs fcvm puts in the guest, built statically with the host's gcc.

They run where Python would be too slow under emulation, or where the container's
image has no libc to offer (the gate runs inside any container). Sources live in
assets/data; the rootfs key includes their text, so changing one rebuilds the rootfs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fcvm.errors import FcvmError

DATA = Path(__file__).parent / "data"
CFLAGS = ("-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror")

# guest path -> source in assets/data
GUEST_PROGRAMS = {
    "usr/lib/fcvm/gate": "gate.c",
}


def sources() -> list[str]:
    """The programs' source texts, for the rootfs key."""
    return [(DATA / src).read_text() for src in GUEST_PROGRAMS.values()]


def build_static(source: Path, out: Path) -> None:
    """gcc -static source -> out (FcvmError in one line if it cannot)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FcvmError("gcc is needed to build fcvm's guest programs",
                        hint="apt-get install gcc libc6-dev")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([gcc, *CFLAGS, "-o", str(out), str(source)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise FcvmError(f"building {source.name} failed: {lines[-1] if lines else proc.returncode}",
                        hint="apt-get install gcc libc6-dev")  # fmt: skip


def install(root: Path) -> None:
    """Build every guest program into the root filesystem tree at root."""
    for guest_path, src in GUEST_PROGRAMS.items():
        target = root / guest_path
        build_static(DATA / src, target)
        target.chmod(0o755)
