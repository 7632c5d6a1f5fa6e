"""VM networking: rootless (user+net namespace, slirp4netns) and bridged (veth, NAT).

    forwards = parse_publish(["8080:80", "127.0.0.1:5353:53/udp"])
    net = setup_network(vm_id, "rootless", forwards, workdir=vm_workdir)
    VmConfig(..., net=net.vmm_net(), netns_exec=net.netns_exec,
             cmdline_extra=(*net.guest_cmdline(), ...))
    ...  # stop the VMM first, then:
    net.teardown()                    # or teardown_from_record(net.record()) elsewhere

handle.py is the common part (setup_network, NetHandle, teardown_from_record),
rootless.py and bridged.py the two layouts, netns.py the VM's namespace, its holder
and fcvm's fds on it, watch.py the running VM's helpers (NetHandle.check()),
alloc.py the leases, iptables.py bridged NAT, publish.py --publish, proc.py host
helpers. DESIGN.md ("Networking") has the reasons.
"""

from __future__ import annotations

from fcvm.net.handle import (
    NetHandle,
    proxy_env,
    reap_record,
    setup_network,
    teardown_from_record,
)
from fcvm.net.publish import PortForward, parse_publish

__all__ = [
    "NetHandle",
    "PortForward",
    "parse_publish",
    "proxy_env",
    "reap_record",
    "setup_network",
    "teardown_from_record",
]
