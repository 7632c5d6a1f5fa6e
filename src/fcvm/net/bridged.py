"""The bridged layout (`--network bridged`, root only): a veth to the host, NAT by iptables.

    host: fcvmbN (10.213.N.1/30) ══veth══ VM netns: veth0 ─┬─ br0 ─ tap0   guest 10.213.N.2/30
          iptables FCVM-* chains: MASQUERADE out, DNAT for --publish, FORWARD accept

The rules are iptables.py's; the /30s come from alloc.py's pool.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fcvm import log
from fcvm.errors import FcvmError
from fcvm.net import iptables, netns
from fcvm.net.alloc import Leases, Record, bridge_pool, pick_subnet
from fcvm.net.netns import MTU
from fcvm.net.proc import need_tool, read_setting, run
from fcvm.net.publish import PortForward

if TYPE_CHECKING:
    from fcvm.net.handle import NetHandle

_log = log.get("fcvm.net")


def check_host(root: bool) -> None:
    """Fail early, in one line, if bridged networking cannot work here; turn on
    IPv4 forwarding if it is off."""
    if not root:
        raise FcvmError(
            "--network bridged needs root", hint="run as root or use the default rootless mode"
        )
    need_tool("iptables", "bridged networking (NAT)")
    need_tool("iptables-restore", "bridged networking (NAT)")
    _ensure_ip_forward()


def allocate(
    rec: Record, leases: Leases, publish: list[PortForward]
) -> tuple[str, list[PortForward]]:
    """Under the lease lock: a free /30 (host .1 = gateway, guest .2) and the veth's
    name; returns the host address and the forwards (default 0.0.0.0, as podman)."""
    used_nets = [
        ipaddress.IPv4Network(str(r["subnet"])) for r in leases.leases.values() if r.get("subnet")
    ]
    index, subnet = pick_subnet(bridge_pool(), used_nets, _host_routes())
    hosts = list(subnet.hosts())
    host_ip = str(hosts[0])
    forwards = [
        PortForward(f.host_ip or "0.0.0.0", f.host_port, f.guest_port, f.proto) for f in publish
    ]
    rec.update(
        subnet=str(subnet),
        veth=f"fcvmb{index}",
        guest_ip=str(hosts[1]),
        prefix_len=subnet.prefixlen,
        gateway=host_ip,
    )
    return host_ip, forwards


def _host_dns() -> list[str]:
    """Host resolvers a bridged guest can reach (not loopback ones)."""
    for conf in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        servers: list[str] = []
        for line in (read_setting(conf) or "").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    ip = ipaddress.ip_address(parts[1].split("%")[0])
                except ValueError:
                    continue
                if ip.version == 4 and not ip.is_loopback:
                    servers.append(str(ip))
        if servers:
            return servers[:3]
    return []


def _host_routes() -> list[ipaddress.IPv4Network]:
    out: list[ipaddress.IPv4Network] = []
    try:
        text = run(["ip", "-4", "-j", "route", "show", "table", "all"], "cannot read routes")
        for r in json.loads(text or "[]"):
            dst = r.get("dst", "")
            if dst and dst != "default":
                try:
                    out.append(ipaddress.IPv4Network(dst, strict=False))
                except ValueError:
                    continue
    except (FcvmError, ValueError) as e:
        _log.debug("routes: %s", e)
    return out


def _ensure_ip_forward() -> None:
    """Bridged VMs reach the outside only if the host forwards IPv4.

    Like podman and docker we switch it on (bridged mode is explicitly asked for and is
    useless without it) and say so once; we leave it on at teardown, since other VMs or
    containers may rely on it by then."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if read_setting(str(path)) == "1":
        return
    try:
        path.write_text("1\n")
    except OSError as e:
        raise FcvmError(
            f"IPv4 forwarding is off and cannot be enabled ({e.strerror})",
            hint="sysctl -w net.ipv4.ip_forward=1",
        ) from None
    _log.warning("enabled net.ipv4.ip_forward (was 0) for bridged networking")


def setup(h: NetHandle) -> None:
    """Namespace, veth pair, br0, DNS, and the iptables rules (noted in the lease first)."""
    rec = h._rec
    holder = netns.start_holder(h, False)
    veth = str(rec["veth"])
    run(
        ["ip", "-batch", "-"],
        "cannot create the VM's veth pair",
        input=(
            f"link add {veth} mtu {MTU} type veth peer name veth0 netns {holder.pid}\n"
            f"addr add {h.gateway}/{h.prefix_len} dev {veth}\n"
        ),
    )
    # let DNAT'd connections from the host's own loopback reach the VM (see iptables.py)
    Path(f"/proc/sys/net/ipv4/conf/{veth}/route_localnet").write_text("1\n")
    run(["ip", "link", "set", veth, "up"], "cannot bring up the veth")
    netns.ns_batch(
        h.netns_exec, netns.bridge_lines("veth0", False), "cannot set up the VM namespace"
    )
    h.dns = _host_dns()
    if not h.dns:
        _log.warning("net: no non-loopback DNS server in /etc/resolv.conf; guest has no DNS")
    with Leases(Path(str(rec["net_dir"]))) as leases:
        rec["iptables"] = True
        leases.put(h.vm_id, rec)
        iptables.add_vm(str(rec["tag"]), veth, str(rec["subnet"]), h.guest_ip, h.forwards)
