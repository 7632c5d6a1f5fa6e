"""What PID 1 must do in the guest: mounts, hostname, network, power-off."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import subprocess

log = logging.getLogger("fcvm.agent")

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
)
STORAGE_DIR = "/var/lib/containers"  # podman's storage: the container's writable layer


def mount_storage(device: str | None) -> None:
    """podman's storage on the VM's own disk (fcvm.storage=DEVICE: an empty ext4 the
    host made for this VM; noinit_itable: its inode tables were never zeroed, and
    zeroing them in the background would cost the emulated guest for nothing), else
    in guest RAM (--disk-size ram). The root disk is shared and read-only either way.
    Where the device takes discards (QEMU's), the filesystem sends them as it frees
    blocks: the host's file shrinks when the container deletes what it wrote."""
    if STORAGE_DIR in _mounted():
        return
    if device:
        options = "noinit_itable" + (",discard" if takes_discards(device) else "")
        mount(device, STORAGE_DIR, "ext4", options)
        os.chmod(STORAGE_DIR, 0o700)
    else:
        mount("tmpfs", STORAGE_DIR, "tmpfs", "mode=0700")


def takes_discards(device: str) -> bool:
    """Whether the block device accepts discard requests (its queue's limit is not 0)."""
    name = os.path.basename(device)
    try:
        return int(read_text(f"/sys/class/block/{name}/queue/discard_max_bytes")) > 0
    except (OSError, ValueError):
        return False


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    """The fcvm.* kernel parameters, without the prefix."""
    try:
        words = read_text(path).split()
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
        return {line.split()[1] for line in read_text("/proc/mounts").splitlines()}
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
        controllers = read_text("/sys/fs/cgroup/cgroup.controllers").split()
        write_text("/sys/fs/cgroup/cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/ptmx", "pts/ptmx")):
        if not os.path.lexists(link):
            with contextlib.suppress(OSError):
                os.symlink(target, link)


def set_hostname(name: str) -> None:
    with contextlib.suppress(OSError):
        socket.sethostname(name)
        write_text("/etc/hostname", name + "\n")


def network_commands(params: dict[str, str]) -> list[str]:
    """`ip -batch` lines: lo always; eth0 from the host's net setup (fcvm.ip=ADDR/PREFIX
    fcvm.gw=GW fcvm.mtu=N and, where the host has IPv6, fcvm.ip6=ADDR/PREFIX fcvm.gw6=GW)."""
    cmds = ["link set lo up"]
    ip = params.get("ip")
    if not ip:
        return cmds
    if params.get("mtu"):
        cmds.append(f"link set eth0 mtu {params['mtu']}")
    cmds += ["link set eth0 up", f"addr add {ip} dev eth0"]
    if params.get("gw"):
        cmds.append(f"route replace default via {params['gw']}")
    if params.get("ip6"):
        # (no "-6": a batch line takes no global options; the addresses set the family)
        cmds.append(f"addr add {params['ip6']} dev eth0 nodad")
        if params.get("gw6"):
            cmds.append(f"route replace default via {params['gw6']}")
    return cmds


def run_ip_batch(lines: list[str]) -> None:
    """One `ip -batch` process for all of lines: every fork+exec costs tens of
    milliseconds in an emulated guest, and this is on the boot (and restore) path."""
    proc = subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        log.warning("network setup: %s", " / ".join(proc.stderr.split("\n")).strip(" /"))


def configure_network(params: dict[str, str]) -> None:
    """Loopback, eth0 and DNS, from the host's parameters."""
    run_ip_batch(network_commands(params))
    dns = [d for d in params.get("dns", "").split(",") if d]
    if dns:
        write_text("/etc/resolv.conf", "".join(f"nameserver {d}\n" for d in dns))


def power_off() -> None:
    os.sync()
    _libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
