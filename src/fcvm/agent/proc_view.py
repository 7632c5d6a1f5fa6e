"""The held container seen from the guest through /proc/PID (its root, environ, stat).

Reading the container's files this way needs no podman command (each costs ~1 s under
emulation): its default program read ahead of the image cache's snapshot, the user
`--user` names, the environment its config gives, a zombie's exit status, a terminal
of its own devpts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import struct
from dataclasses import dataclass

from fcvm.agent.image import ProcError
from fcvm.procstat import stat_fields

# Where an image's libc usually is: read with its default command, so a snapshot taken
# now holds them in the guest's page cache.
LIBC_PATHS = (
    "/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/libc.musl-x86_64.so.1", "/lib64/libc.so.6", "/usr/lib64/libc.so.6",
)  # fmt: skip


def warm_page_cache(pid: int, argv: tuple[str, ...]) -> None:
    """Read the image's default program (and its ELF interpreter and libc) through the
    held container's root, /proc/PID/root: a VM restored from the snapshot taken next
    finds them in its page cache instead of reading its disk under emulation."""
    root = f"/proc/{pid}/root"
    if not argv:
        return
    program = argv[0]
    if "/" not in program:
        path = _path_of(pid)
        program = next((f"{d}/{program}" for d in path.split(":")
                        if os.path.isfile(f"{root}{d}/{program}")), "")  # fmt: skip
    files = [program, *LIBC_PATHS] if program else list(LIBC_PATHS)
    interp = _elf_interpreter(root + program) if program else None
    if interp:
        files.append(interp)
    for name in files:
        with contextlib.suppress(OSError), open(root + name, "rb") as f:
            while f.read(1 << 20):
                pass


def _path_of(pid: int) -> str:
    """The PATH of the container's process (its environ), else the usual default."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"PATH="):
                    return item[5:].decode(errors="replace")
    except OSError:
        pass
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _elf_interpreter(path: str) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:5] != b"\x7fELF\x02" or head[5] != 1:
                return None
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                (ptype,) = struct.unpack_from("<I", table, i * phentsize)
                if ptype == 3:  # PT_INTERP
                    (offset,) = struct.unpack_from("<Q", table, i * phentsize + 8)
                    (size,) = struct.unpack_from("<Q", table, i * phentsize + 32)
                    f.seek(offset)
                    return f.read(size).rstrip(b"\0").decode(errors="replace")
    except (OSError, struct.error, IndexError):
        return None
    return None


@dataclass(frozen=True)
class ProcessConfig:
    """What podman gave the container's process (its config.json): what `crun exec`
    starts from, as `podman exec` does. crun's own defaults are root in /, which is not
    what an image with USER or WORKDIR runs as."""

    env: tuple[tuple[str, str], ...] = ()
    user: str = ""  # "UID:GID", or "" if not known
    cwd: str = ""


def process_config(path: str) -> ProcessConfig:
    try:
        with open(path) as f:
            proc = json.load(f).get("process", {})
        env = proc.get("env", [])
        user = proc.get("user", {})
        uid, gid, cwd = user.get("uid"), user.get("gid"), proc.get("cwd", "")
    except (OSError, ValueError, AttributeError):
        return ProcessConfig()
    return ProcessConfig(
        env=tuple(tuple(e.split("=", 1)) for e in env if isinstance(e, str) and "=" in e),  # type: ignore[misc]
        user=f"{uid}:{gid}" if isinstance(uid, int) and isinstance(gid, int) else "",
        cwd=cwd if isinstance(cwd, str) and cwd.startswith("/") else "",
    )


def resolve_user(pid: int, user: str) -> str:
    """podman's --user for crun: "name", "uid", "name:group", "uid:gid" -> "UID:GID", from
    the container's /etc/passwd and /etc/group (through /proc/PID/root); a user's group
    is its primary one, and a uid with no entry gets gid 0, as podman does."""
    name, _, group = user.partition(":")

    def entry(file: str, key: str) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/root/etc/{file}") as f:
                for line in f:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) >= 3 and key in (fields[0], fields[2]):
                        return fields
        except OSError:
            pass
        return None

    found = entry("passwd", name)
    if found is None and not name.isdigit():
        raise ProcError(f"unable to find user {name}: no matching entries in passwd file", 125)
    uid = int(name) if name.isdigit() else int(found[2]) if found else 0
    gid = int(found[3]) if found and len(found) > 3 and found[3].isdigit() else 0
    if group:
        g = entry("group", group)
        if g is None and not group.isdigit():
            raise ProcError(f"unable to find group {group}: no matching entries in group file",
                            125)  # fmt: skip
        gid = int(group) if group.isdigit() else int(g[2]) if g else 0
    return f"{uid}:{gid}"


def zombie_status(pid: int) -> int | None:
    """A zombie's exit code as a shell reports it (128+N for signal N), else None."""
    fields = stat_fields(pid)
    if not fields or fields[0] != "Z" or len(fields) < 50:
        return None
    status = int(fields[49])  # field 52 overall: waitpid's status word
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


TIOCSPTLCK = 0x40045431  # unlockpt()
TIOCGPTPEER = 0x5441  # the slave of this master, as a new descriptor (Linux 4.13)


def container_pty(pid: int) -> tuple[int, int]:
    """(master, slave) of a new terminal in the container's own devpts, as podman's -t
    gives: inside, the slave is /dev/pts/N of the container's /dev/pts, so ttyname()
    and `tty` work. (A terminal of the guest's devpts would be a TTY there all the same,
    but one without a name in the container.) Falls back to the guest's devpts."""
    try:
        master = os.open(f"/proc/{pid}/root/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return pty.openpty()
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        return pty.openpty()
    return master, slave
