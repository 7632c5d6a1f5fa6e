"""What PID 1 must do in the guest: mounts, hostname, network, power-off."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)

# (source, target, fstype, options) in mount order.
BASIC_MOUNTS = (
    ("proc", "/proc", "proc", ""),
    ("sysfs", "/sys", "sysfs", ""),
    ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
    ("devpts", "/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666"),
    ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", "nsdelegate"),
    ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
    # podman's storage lives in guest RAM: the root disk is shared and read-only.
    ("tmpfs", "/var/lib/containers", "tmpfs", "mode=0700"),
)


def read_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    """The fcvm.* kernel parameters, without the prefix."""
    try:
        words = Path(path).read_text().split()
    except OSError:
        return {}
    params = {}
    for word in words:
        if word.startswith("fcvm."):
            key, _, value = word[5:].partition("=")
            params[key] = value
    return params


def _mounted() -> set[str]:
    try:
        return {line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()}
    except OSError:
        return set()


def mount(source: str, target: str, fstype: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def mount_basics() -> None:
    for source, target, fstype, options in BASIC_MOUNTS:
        if target in _mounted():
            continue
        mount(source, target, fstype, options)
    # Let podman/crun use the usual controllers in child cgroups.
    with contextlib.suppress(OSError):
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        Path("/sys/fs/cgroup/cgroup.subtree_control").write_text(
            " ".join(f"+{c}" for c in controllers)
        )
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/ptmx", "pts/ptmx")):
        if not os.path.lexists(link):
            with contextlib.suppress(OSError):
                os.symlink(target, link)


def set_hostname(name: str) -> None:
    with contextlib.suppress(OSError):
        socket.sethostname(name)
        Path("/etc/hostname").write_text(name + "\n")


def bring_up_loopback() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)


def configure_network(params: dict[str, str]) -> None:
    """eth0 from the host's net setup: fcvm.ip=ADDR/PREFIX fcvm.gw=GW fcvm.mtu=N
    fcvm.dns=A[,B] and, where the host has IPv6, fcvm.ip6=ADDR/PREFIX fcvm.gw6=GW."""
    ip = params.get("ip")
    if not ip:
        return

    def run(*argv: str) -> None:
        subprocess.run(["ip", *argv], check=False)

    if params.get("mtu"):
        run("link", "set", "eth0", "mtu", params["mtu"])
    run("link", "set", "eth0", "up")
    run("addr", "add", ip, "dev", "eth0")
    if params.get("gw"):
        run("route", "add", "default", "via", params["gw"])
    if params.get("ip6"):
        run("-6", "addr", "add", params["ip6"], "dev", "eth0", "nodad")
        if params.get("gw6"):
            run("-6", "route", "add", "default", "via", params["gw6"])
    dns = [d for d in params.get("dns", "").split(",") if d]
    if dns:
        Path("/etc/resolv.conf").write_text("".join(f"nameserver {d}\n" for d in dns))


def power_off() -> None:
    os.sync()
    _libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
