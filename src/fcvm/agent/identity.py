"""A VM restored from a snapshot takes on the identity of its new run.

The snapshot's guest believes it is the VM that was snapshotted, at the time it was
snapshotted. The host's `identity` request (right after the new session starts, before
anything runs) carries what must change, and each part is applied here:

clock     CLOCK_REALTIME set to the host's time (the snapshot's clock is stale)
entropy   host random bytes credited to the kernel's pool, and the CRNG reseeded, so two
          VMs restored from one snapshot never share random numbers
hostname  the guest's (the container shares the guest's UTS namespace) and the files
          podman made for the container (/etc/hostname, /etc/hosts)
network   eth0's MAC, addresses and routes, the neighbour cache (a new gateway), DNS for
          the guest and the container - only what differs from the running values
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from fcvm.agent import system

if TYPE_CHECKING:
    from fcvm.agent.container import Container

log = logging.getLogger("fcvm.agent")

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
SIOCSIFHWADDR = 0x8924
ARPHRD_ETHER = 1
NET_KEYS = ("ip", "gw", "mtu", "dns", "ip6", "gw6", "mac")
ADDRESS_KEYS = ("ip", "gw", "mtu", "ip6", "gw6")


def set_clock(time_ns: int, sent_at: float) -> float:
    """Set the wall clock to the host's (plus the time this message took); the step in
    seconds (how stale the snapshot's clock was)."""
    now = time.clock_gettime_ns(time.CLOCK_REALTIME)
    target = time_ns + int((time.monotonic() - sent_at) * 1e9)
    time.clock_settime_ns(time.CLOCK_REALTIME, target)
    return (target - now) / 1e9


def add_entropy(data: bytes) -> None:
    """Credit data to the kernel's entropy pool and force the CRNG to reseed from it."""
    with open("/dev/urandom", "wb") as f:
        request = struct.pack("ii", len(data) * 8, len(data)) + data
        fcntl.ioctl(f.fileno(), RNDADDENTROPY, request)
        with contextlib.suppress(OSError):  # (kernels before 5.x lack it)
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)


def set_hostname(name: str, container: Container | None) -> None:
    """The kernel's hostname (the container shares the guest's UTS namespace) and the
    container's /etc/hostname and /etc/hosts (podman's files). The guest's own
    /etc/hostname is left: nothing reads it after boot."""
    old = socket.gethostname()
    socket.sethostname(name)
    if container is None or not container.container_id:
        return
    with contextlib.suppress(OSError):
        system.write_text(container.userdata("hostname"), name + "\n")
    hosts = container.userdata("hosts")
    with contextlib.suppress(OSError):
        text = system.read_text(hosts)
        if old and old != name:
            lines = [" ".join(name if w == old else w for w in line.split())
                     for line in text.splitlines()]  # fmt: skip
            system.write_text(hosts, "\n".join(lines) + "\n")


def set_mac(mac: str, interface: str = "eth0") -> None:
    """One ioctl (virtio-net takes a new address while up): forking `ip` costs tens of
    milliseconds under emulation, and this is on every restore's path."""
    raw = bytes.fromhex(mac.replace(":", ""))
    ifreq = struct.pack("16sH6s8x", interface.encode(), ARPHRD_ETHER, raw)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCSIFHWADDR, ifreq)


def reconfigure_network(current: dict[str, str], wanted: dict[str, str],
                        container: Container | None) -> list[str]:  # fmt: skip
    """Apply wanted where it differs from current; what changed. (Rootless VMs all sit
    at the same address on their own slirp network: only the MAC changes there.)"""
    changed = []
    if wanted.get("mac") and wanted["mac"] != current.get("mac"):
        set_mac(wanted["mac"])
        changed.append("mac")
    if any(current.get(k, "") != wanted.get(k, "") for k in ADDRESS_KEYS):
        # (flushing the addresses drops the routes through them; a new gateway needs
        # the neighbour cache emptied)
        lines = ["addr flush dev eth0", "neigh flush dev eth0"]
        lines += [line for line in system.network_commands(wanted) if line != "link set lo up"]
        system.run_ip_batch(lines)
        changed.append("addresses")
    if current.get("dns", "") != wanted.get("dns", ""):
        dns = [d for d in wanted.get("dns", "").split(",") if d]
        resolv = "".join(f"nameserver {d}\n" for d in dns)
        with contextlib.suppress(OSError):
            system.write_text("/etc/resolv.conf", resolv)
            if container is not None and container.container_id:
                system.write_text(container.userdata("resolv.conf"), resolv)
        changed.append("dns")
    return changed


def apply(msg: dict[str, Any], params: dict[str, str], container: Container | None
          ) -> dict[str, Any]:  # fmt: skip
    """The identity request: apply each part it carries; what was done, for the host's
    log. params are the running network parameters (updated)."""
    t0 = time.monotonic()
    done: dict[str, Any] = {}
    steps: dict[str, float] = {}  # milliseconds each step took (bench/ reads them)

    def step(name: str, since: float) -> float:
        now = time.monotonic()
        steps[name] = round((now - since) * 1000, 1)
        return now

    t = t0
    if isinstance(msg.get("time_ns"), int):
        done["clock_step_s"] = round(set_clock(msg["time_ns"], t0), 3)
        t = step("clock", t)
    if isinstance(msg.get("entropy"), str):
        add_entropy(base64.b64decode(msg["entropy"]))
        done["entropy"] = True
        t = step("entropy", t)
    if isinstance(msg.get("hostname"), str) and msg["hostname"]:
        set_hostname(msg["hostname"], container)
        done["hostname"] = msg["hostname"]
        t = step("hostname", t)
    net = msg.get("net")
    if isinstance(net, dict):
        wanted = {k: str(v) for k, v in net.items() if k in NET_KEYS and v is not None}
        changed = reconfigure_network(params, wanted, container)
        if changed:
            params.clear()
            params.update(wanted)
            done["network"] = changed
        t = step("network", t)
    done["seconds"] = round(time.monotonic() - t0, 4)
    done["steps_ms"] = steps
    # (the host logs what this returns: a console line costs milliseconds under TCG)
    return done


def current_mac() -> str:
    with contextlib.suppress(OSError):
        return system.read_text("/sys/class/net/eth0/address").strip()
    return ""
