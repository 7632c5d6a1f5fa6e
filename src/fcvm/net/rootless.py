"""The rootless layout (the default; as root too): a namespace on slirp4netns' own LAN.

    host netns                       | VM netns (+ user netns when not root)
    slirp4netns ──tap fd──────────────> slirp0 ─┐
      hostfwd 127.77.a.b:HP -> 10.0.2.100:GP    ├─ br0 (no address)
      10.0.2.2 = host 127.0.0.1                 │
      10.0.2.3 = DNS (host resolv.conf)  tap0 ──┘  <- the VMM opens it; guest eth0 10.0.2.100/24

The guest sits on slirp's own virtual LAN (bridged with slirp's tap inside the
namespace), so port forwards go straight to the guest address and nothing inside
the namespace routes or NATs. Each VM's forwards bind on its own 127.77.x.y.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcvm.errors import FcvmError
from fcvm.net import netns
from fcvm.net.alloc import Leases, Record, pick_loopback
from fcvm.net.netns import MTU
from fcvm.net.proc import need_tool, read_setting, start_time
from fcvm.net.publish import PortForward

if TYPE_CHECKING:
    from fcvm.net.handle import NetHandle

# slirp4netns' virtual network (its defaults; 10.0.2.100 is what podman uses too)
SLIRP_CIDR = "10.0.2.0/24"
SLIRP_GUEST = "10.0.2.100"
SLIRP_GW = "10.0.2.2"  # = the host's 127.0.0.1
SLIRP_DNS = "10.0.2.3"
SLIRP_GUEST6 = "fd00::100"
SLIRP_GW6 = "fd00::2"  # = the host's ::1
SLIRP_DNS6 = "fd00::3"


def check_host(root: bool) -> None:
    """Fail early, in one line, if this host cannot do rootless networking."""
    need_tool("slirp4netns", "rootless networking")
    if not root and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise FcvmError(
            "rootless networking cannot open /dev/net/tun (permission denied)",
            hint="its usual mode is 0666: chmod 0666 /dev/net/tun",
        )
    if not root:
        for key, path in (
            ("kernel.unprivileged_userns_clone", "/proc/sys/kernel/unprivileged_userns_clone"),
            ("user.max_user_namespaces", "/proc/sys/user/max_user_namespaces"),
        ):
            if read_setting(path) == "0":
                raise FcvmError(
                    f"rootless networking needs user namespaces, but {key}=0",
                    hint=netns.userns_hint(),
                )


MAX_ADDRESS_TRIES = 16


def allocate(
    rec: Record, leases: Leases, publish: list[PortForward]
) -> tuple[str, list[PortForward]]:
    """Under the lease lock: the VM's own loopback address (returned with the forwards,
    which bind on it unless they name an address) and the guest's slirp address."""
    used = [str(r.get("host_ip")) for r in leases.leases.values()]
    host_ip = first = pick_loopback(used)
    # Leases are per base directory: a VM of another (another user's, a test suite's)
    # may hold one of our ports at this address. Move on to the next address then (a
    # few times: a port held on every address - 0.0.0.0 - is reported as in use).
    for _ in range(MAX_ADDRESS_TRIES):
        if not any(PortForward(host_ip, f.host_port, 0, f.proto).bind_error()
                   for f in publish if not f.host_ip):  # fmt: skip
            break
        used.append(host_ip)
        host_ip = pick_loopback(used)
    else:
        host_ip = first
    forwards = [
        PortForward(f.host_ip or host_ip, f.host_port, f.guest_port, f.proto) for f in publish
    ]
    rec.update(guest_ip=SLIRP_GUEST, prefix_len=24, gateway=SLIRP_GW)
    return host_ip, forwards


def _host_has_ipv6() -> bool:
    if read_setting("/proc/sys/net/ipv6/conf/all/disable_ipv6") != "0":
        return False
    inet6 = read_setting("/proc/net/if_inet6") or ""
    return any(line.split()[-1] == "lo" for line in inet6.splitlines() if line.split())


def _slirp_api(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode())
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(4096):
            buf += chunk
    reply = json.loads(buf.decode() or "{}")
    return reply if isinstance(reply, dict) else {}


def _api_socket_path(workdir: Path, vm_id: str) -> Path:
    """Unix socket paths are limited to 107 bytes: fall back to the temp dir."""
    p = workdir / "slirp4netns.sock"
    if len(str(p)) <= 100:
        return p
    return Path(tempfile.gettempdir()) / f"fcvm-slirp-{vm_id[:20]}-{os.getpid()}.sock"


@dataclass
class SlirpStart:
    """A slirp4netns just launched: it writes "1" to ready_fd once serving; it exits at
    EOF of exit_fd (ours, kept while the VM runs)."""

    proc: subprocess.Popen[bytes]
    ready_fd: int
    exit_fd: int


def launch_slirp(h: NetHandle) -> SlirpStart:
    """Start slirp4netns on the VM namespace's slirp0 (does not wait for it).

    slirp0 is a persistent TAP made in the namespace (netns.bridge_lines) and bridged
    to br0, so a slirp4netns started again after one died attaches to the same device:
    the namespace, br0 and the guest see nothing change. The namespaces are reached
    through fcvm's own fds (h._ns), not through the holder, which may be gone too."""
    rec, ns = h._rec, h._ns
    assert ns is not None
    api = Path(str(rec["api_socket"]))
    api.unlink(missing_ok=True)  # a dead slirp4netns leaves its socket file behind
    # run slirp4netns as root of the VM's user namespace (still in the host's network
    # namespace) so its sandbox may make a mount namespace
    prefix = [*ns.enter_user(), need_tool("slirp4netns", "rootless networking")]
    opts = [f"--api-socket={api}", f"--mtu={MTU}", f"--cidr={SLIRP_CIDR}",
            "--enable-sandbox", "--enable-seccomp", "--netns-type=path"]  # fmt: skip
    if ns.user >= 0:
        opts.append(f"--userns-path={ns.user_path}")
    if rec.get("ipv6"):
        opts.append("--enable-ipv6")
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    cmd = [*prefix, f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", *opts, ns.net_path, "slirp0"]
    try:
        with open(str(rec["slirp_log"]), "ab") as out:
            slirp = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(ready_w, exit_r, *ns.fds),
                start_new_session=True,
            )
    except BaseException:
        os.close(ready_r)
        os.close(exit_w)
        raise
    finally:
        os.close(ready_w)
        os.close(exit_r)
    return SlirpStart(slirp, ready_r, exit_w)


def slirp_log_tail(rec: Record) -> str:
    """slirp4netns' last words (its log), for error messages."""
    try:
        text = Path(str(rec["slirp_log"])).read_text(errors="replace")
    except (OSError, KeyError):
        return ""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


def add_forwards(h: NetHandle) -> None:
    """Publish h's ports through slirp4netns' API (at setup, and again after a restart)."""
    api = str(h._rec["api_socket"])
    for f in h.forwards:
        try:
            reply = _slirp_api(
                api,
                {
                    "execute": "add_hostfwd",
                    "arguments": {
                        "proto": f.proto,
                        "host_addr": f.host_ip,
                        "host_port": f.host_port,
                        "guest_addr": SLIRP_GUEST,
                        "guest_port": f.guest_port,
                    },
                },
            )
        except (OSError, ValueError) as e:
            raise FcvmError(f"cannot publish {f.spec()}: slirp4netns API: {e}") from None
        if "return" not in reply:
            err = reply.get("error", {})
            desc = err.get("desc") if isinstance(err, dict) else err
            raise FcvmError(f"cannot publish {f.spec()}: {desc or 'refused by slirp4netns'}")


def setup(h: NetHandle, workdir: Path, *, userns: bool) -> None:
    """Namespaces, br0, slirp4netns on slirp0 and its port forwards to the guest."""
    rec = h._rec
    netns.start_holder(h, userns)
    netns.ns_batch(
        h.netns_exec, netns.bridge_lines("slirp0", True), "cannot set up the VM namespace"
    )
    ipv6 = _host_has_ipv6()
    rec["ipv6"] = ipv6
    rec["api_socket"] = str(_api_socket_path(workdir, h.vm_id))
    rec["slirp_log"] = str(workdir / "slirp4netns.log")
    start = launch_slirp(h)
    h.add_helper("slirp", start.proc, start.exit_fd)
    rec["slirp"] = [start.proc.pid, start_time(start.proc.pid)]
    try:
        ready, _, _ = select.select([start.ready_fd], [], [], 10)
        ok = bool(ready) and os.read(start.ready_fd, 1) == b"1"
    finally:
        os.close(start.ready_fd)
    if not ok:
        raise FcvmError(f"slirp4netns did not start: {slirp_log_tail(rec) or 'no reply'}")
    h.dns = [SLIRP_DNS]
    if ipv6:
        h.guest_ip6, h.prefix_len6, h.gateway6 = SLIRP_GUEST6, 64, SLIRP_GW6
        h.dns.append(SLIRP_DNS6)
    add_forwards(h)
