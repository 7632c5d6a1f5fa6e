"""setup_network / NetHandle / teardown_from_record: the two network layouts.

Rootless (default; root or not):

    host netns                       | VM netns (+ user netns when not root)
    slirp4netns ──tap fd──────────────> slirp0 ─┐
      hostfwd 127.77.a.b:HP -> 10.0.2.100:GP    ├─ br0 (no address)
      10.0.2.2 = host 127.0.0.1                 │
      10.0.2.3 = DNS (host resolv.conf)  tap0 ──┘  <- the VMM opens it; guest eth0 10.0.2.100/24

  The guest sits on slirp's own virtual LAN (bridged with slirp's tap inside the
  namespace), so port forwards go straight to the guest address and nothing inside
  the namespace routes or NATs. Each VM's forwards bind on its own 127.77.x.y.

Bridged (root only):

    host: fcvmbN (10.213.N.1/30) ══veth══ VM netns: veth0 ─┬─ br0 ─ tap0   guest 10.213.N.2/30
          iptables FCVM-* chains: MASQUERADE out, DNAT for --publish, FORWARD accept

The namespaces are held by a tiny holder process (`unshare ... sh -c 'exec cat'`),
which exits when its stdin pipe reaches EOF, i.e. when the fcvm process that made
it dies for any reason (kill -9 included); slirp4netns exits the same way through
its --exit-fd. A pipe rather than PR_SET_PDEATHSIG because the death signal follows
the creating *thread*, and a runner that calls setup_network from a worker thread
would lose its network when that thread ends. What cannot die with a process
(iptables rules, the lease, a stray veth) is in the record and is removed by
teardown_from_record, by `fcvm gc`, or by the next setup_network (stale leases).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import select
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcvm import log, paths
from fcvm.errors import FcvmError
from fcvm.net import iptables
from fcvm.net.alloc import Leases, Record, bridge_pool, pick_loopback, pick_subnet, port_conflict
from fcvm.net.proc import alive, end_child, end_process, need_tool, run, start_time, try_run
from fcvm.net.publish import PortForward

if TYPE_CHECKING:
    from fcvm.vmm.base import NetIface

_log = log.get("fcvm.net")

MODES = ("rootless", "bridged")
RECORD_VERSION = 1
MTU = 1500
TAP = "tap0"
# slirp4netns' virtual network (its defaults; 10.0.2.100 is what podman uses too)
SLIRP_CIDR = "10.0.2.0/24"
SLIRP_GUEST = "10.0.2.100"
SLIRP_GW = "10.0.2.2"  # = the host's 127.0.0.1
SLIRP_DNS = "10.0.2.3"
SLIRP_GUEST6 = "fd00::100"
SLIRP_GW6 = "fd00::2"  # = the host's ::1
SLIRP_DNS6 = "fd00::3"
_HOLD = "echo ready; exec cat >/dev/null"
_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


def proxy_env(
    environ: dict[str, str] | None = None, *, host_alias: str | None = None
) -> dict[str, str]:
    """http_proxy/https_proxy/no_proxy (and ftp/all) from the host environment, both cases.

    With host_alias (rootless: 10.0.2.2), a proxy on the host's loopback
    (localhost, 127.0.0.1, [::1]) is rewritten to the address the guest reaches it by."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name in _PROXY_VARS:
        value = env.get(name) or env.get(name.upper())
        if not value:
            continue
        if host_alias and name != "no_proxy":
            value = re.sub(
                r"(^|//|@)(localhost|127(?:\.\d{1,3}){3}|\[::1\])(?=[:/]|$)",
                lambda m: m.group(1) + host_alias,
                value,
            )
        out[name] = out[name.upper()] = value
    return out


@dataclass(eq=False)
class NetHandle:
    """A VM's network, set up. Hand `tap`/`mac` and `netns_exec` to the VMM, and
    `guest_cmdline()` to the guest kernel. Stop the VMM before teardown()."""

    vm_id: str
    mode: str
    tap: str
    mac: str
    guest_ip: str
    prefix_len: int
    gateway: str
    dns: list[str]
    host_ip: str
    netns_exec: tuple[str, ...]
    forwards: list[PortForward]
    mtu: int = MTU
    guest_ip6: str = ""
    prefix_len6: int = 0
    gateway6: str = ""
    _rec: Record = field(default_factory=dict, repr=False)
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _keep_fds: list[int] = field(default_factory=list, repr=False)
    _torn: bool = field(default=False, repr=False)

    def guest_cmdline(self) -> list[str]:
        """Kernel command-line parameters the guest agent configures eth0 from."""
        args = [
            f"fcvm.ip={self.guest_ip}/{self.prefix_len}",
            f"fcvm.gw={self.gateway}",
            f"fcvm.mtu={self.mtu}",
        ]
        if self.dns:
            args.append(f"fcvm.dns={','.join(self.dns)}")
        if self.guest_ip6:
            args += [f"fcvm.ip6={self.guest_ip6}/{self.prefix_len6}", f"fcvm.gw6={self.gateway6}"]
        return args

    def proxy_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        return proxy_env(environ, host_alias=SLIRP_GW if self.mode == "rootless" else None)

    def vmm_net(self) -> NetIface:
        from fcvm.vmm.base import NetIface

        return NetIface(tap=self.tap, mac=self.mac)

    @property
    def holder_pid(self) -> int | None:
        h = self._rec.get("holder")
        return int(h[0]) if h else None

    def record(self) -> dict[str, Any]:
        """JSON-able; teardown_from_record(record) undoes everything from any process."""
        return json.loads(json.dumps(self._rec))  # type: ignore[no-any-return]

    def teardown(self) -> None:
        """Idempotent, never raises: helpers, links, iptables rules, lease, sockets."""
        if self._torn:
            return
        self._torn = True
        for fd in self._keep_fds:  # EOF on these ends the holder and slirp4netns
            with contextlib.suppress(OSError):
                os.close(fd)
        self._keep_fds.clear()
        for child in self._children:
            end_child(child)
        self._children.clear()
        teardown_from_record(self._rec)


def _log_ignore(what: str, e: BaseException) -> None:
    _log.debug("teardown: %s: %s", what, e)


def _wait_link_gone(name: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/sys/class/net/{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _undo_unlocked(rec: Record) -> None:
    for key in ("slirp", "holder"):
        v = rec.get(key)
        if v:
            end_process(int(v[0]), int(v[1]))
    veth = rec.get("veth")
    if veth and Path(f"/sys/class/net/{veth}").exists():
        # normally gone with the namespace; an explicit delete covers a live one
        try_run(["ip", "link", "del", str(veth)])
        _wait_link_gone(str(veth))
    sock = rec.get("api_socket")
    if sock:
        try:
            Path(sock).unlink(missing_ok=True)
        except OSError as e:
            _log_ignore("api socket", e)


def _undo_locked(rec: Record, leases: Leases) -> None:
    if rec.get("iptables"):
        iptables.remove_vm(str(rec.get("tag") or iptables.tag_for(str(rec["vm_id"]))))
    vm_id = str(rec.get("vm_id", ""))
    cur = leases.leases.get(vm_id)
    if cur is not None and cur.get("owner") == rec.get("owner"):
        leases.drop(vm_id)


def teardown_from_record(record: dict[str, Any]) -> None:
    """Undo a VM's network from its record (also after kill -9 of fcvm). Never raises."""
    try:
        _undo_unlocked(record)
    except Exception as e:
        _log_ignore("processes/links", e)
    try:
        with Leases(Path(str(record.get("net_dir") or paths.net_dir()))) as leases:
            _undo_locked(record, leases)
    except Exception as e:
        _log_ignore("lease/iptables", e)


# ---------------------------------------------------------------- helpers


def _mac_for(vm_id: str) -> str:
    h = hashlib.sha256(vm_id.encode()).digest()
    return "02:fc:" + ":".join(f"{b:02x}" for b in h[:4])


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def userns_hint() -> str:
    """Why unprivileged user namespaces might be off here, and how to allow them."""
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    maxns = _read("/proc/sys/user/max_user_namespaces")
    aa = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if clone == "0":
        return "enable: sysctl -w kernel.unprivileged_userns_clone=1"
    if maxns == "0":
        return "enable: sysctl -w user.max_user_namespaces=15000"
    if aa == "1":
        return (
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns=1)"
        )
    return "unprivileged user namespaces look allowed; see the message above"


def _host_has_ipv6() -> bool:
    if _read("/proc/sys/net/ipv6/conf/all/disable_ipv6") != "0":
        return False
    inet6 = _read("/proc/net/if_inet6") or ""
    return any(line.split()[-1] == "lo" for line in inet6.splitlines() if line.split())


def _host_dns() -> list[str]:
    """Host resolvers a bridged guest can reach (not loopback ones)."""
    for conf in ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"):
        servers: list[str] = []
        for line in (_read(conf) or "").splitlines():
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


def _check_bindable(fwd: PortForward) -> None:
    """Fail now, cleanly, if host_ip:host_port/proto cannot be bound (in use, no right)."""
    family = socket.AF_INET6 if ":" in fwd.host_ip else socket.AF_INET
    kind = socket.SOCK_STREAM if fwd.proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((fwd.host_ip, fwd.host_port))
        except OSError as e:
            where = f"{fwd.host_ip}:{fwd.host_port}/{fwd.proto}"
            if e.errno == 98:  # EADDRINUSE
                raise FcvmError(f"cannot publish {where}: host port already in use") from None
            if e.errno == 13:  # EACCES
                start = _read("/proc/sys/net/ipv4/ip_unprivileged_port_start") or "1024"
                raise FcvmError(
                    f"cannot publish {where}: ports below {start} need root",
                    hint="use a higher host port",
                ) from None
            raise FcvmError(f"cannot publish {where}: {e.strerror}") from None


def _spawn_holder(userns: bool) -> subprocess.Popen[bytes]:
    cmd = [need_tool("unshare", "network namespaces")]
    if userns:
        cmd += ["--user", "--map-root-user"]
    cmd += ["--net", "--", "/bin/sh", "-c", _HOLD]
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C at the terminal is fcvm's to handle
    )
    assert p.stdout is not None and p.stderr is not None
    ready, _, _ = select.select([p.stdout], [], [], 10)
    line = p.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        end_child(p)
        err = " ".join(p.stderr.read().decode(errors="replace").split())[:200]
        p.stdout.close()
        p.stderr.close()
        if userns:
            raise FcvmError(
                f"cannot create a user namespace for rootless networking: {err or 'no reply'}",
                hint=userns_hint(),
            )
        raise FcvmError(f"cannot create a network namespace: {err or 'no reply'}")
    p.stdout.close()
    p.stderr.close()
    return p


def _nsenter(pid: int, userns: bool) -> tuple[str, ...]:
    pre = [need_tool("nsenter", "entering the VM's namespace"), f"--target={pid}", "--net"]
    if userns:
        # keep our uid/gids (e.g. the kvm group); the mapped uid is root in the userns
        pre += ["--user", "--preserve-credentials"]
    return (*pre, "--")


def _ns_batch(netns_exec: tuple[str, ...], lines: list[str], what: str) -> None:
    run([*netns_exec, "ip", "-batch", "-"], what, input="".join(f"{x}\n" for x in lines))


def _bridge_lines(port: str, port_is_tap: bool) -> list[str]:
    lines = [
        "link set lo up",
        f"link add br0 mtu {MTU} type bridge",
        f"tuntap add dev {TAP} mode tap",
        f"link set {TAP} mtu {MTU} master br0 up",
    ]
    if port_is_tap:
        lines.append(f"tuntap add dev {port} mode tap")
    lines += [f"link set {port} mtu {MTU} master br0 up", "link set br0 up"]
    return lines


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


# ---------------------------------------------------------------- setup


def setup_network(vm_id: str, mode: str, publish: list[PortForward], *, workdir: Path) -> NetHandle:
    """Build the VM's network. On failure: FcvmError (one line), nothing left behind."""
    if mode not in MODES:
        raise FcvmError(f"unknown network mode {mode!r} (use rootless or bridged)")
    if not _VM_ID.match(vm_id):
        raise FcvmError(f"invalid VM id {vm_id!r} for networking")
    root = os.geteuid() == 0
    for f in publish:
        if ":" in f.host_ip:  # slirp4netns forwards to the guest's IPv4; DNAT is iptables
            raise FcvmError(f"--publish {f.spec()}: only IPv4 host addresses can be published")
    need_tool("ip", "networking")
    need_tool("unshare", "network namespaces")
    need_tool("nsenter", "entering the VM's namespace")
    if mode == "rootless":
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
                if _read(path) == "0":
                    raise FcvmError(
                        f"rootless networking needs user namespaces, but {key}=0",
                        hint=userns_hint(),
                    )
    else:
        if not root:
            raise FcvmError(
                "--network bridged needs root", hint="run as root or use the default rootless mode"
            )
        need_tool("iptables", "bridged networking (NAT)")
        need_tool("iptables-restore", "bridged networking (NAT)")
        _ensure_ip_forward()

    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FcvmError(f"cannot use {workdir} for the VM's network files: {e.strerror}") from None
    net_dir = paths.net_dir()
    me = os.getpid()
    owner = [me, start_time(me)]
    rec: Record = {
        "version": RECORD_VERSION,
        "vm_id": vm_id,
        "mode": mode,
        "net_dir": str(net_dir),
        "owner": owner,
        "tag": iptables.tag_for(vm_id),
        "holder": None,
        "slirp": None,
        "iptables": False,
    }
    with Leases(net_dir) as leases:
        _reap_stale(leases)
        if vm_id in leases.leases:
            raise FcvmError(f"network for VM {vm_id} is already set up")
        if mode == "rootless":
            used = [str(r.get("host_ip")) for r in leases.leases.values()]
            host_ip = pick_loopback(used)
            forwards = [
                PortForward(f.host_ip or host_ip, f.host_port, f.guest_port, f.proto)
                for f in publish
            ]
            rec.update(guest_ip=SLIRP_GUEST, prefix_len=24, gateway=SLIRP_GW)
        else:
            used_nets = [
                ipaddress.IPv4Network(str(r["subnet"]))
                for r in leases.leases.values()
                if r.get("subnet")
            ]
            index, subnet = pick_subnet(bridge_pool(), used_nets, _host_routes())
            hosts = list(subnet.hosts())
            host_ip = str(hosts[0])
            forwards = [
                PortForward(f.host_ip or "0.0.0.0", f.host_port, f.guest_port, f.proto)
                for f in publish
            ]
            rec.update(
                subnet=str(subnet),
                veth=f"fcvmb{index}",
                guest_ip=str(hosts[1]),
                prefix_len=subnet.prefixlen,
                gateway=host_ip,
            )
        rec["host_ip"] = host_ip
        rec["forwards"] = [f.to_json() for f in forwards]
        conflict = port_conflict(forwards, leases.leases, me=vm_id)
        if conflict:
            raise FcvmError(f"cannot publish: {conflict}")
        for f in forwards:
            _check_bindable(f)
        leases.put(vm_id, rec)

    handle = NetHandle(
        vm_id=vm_id,
        mode=mode,
        tap=TAP,
        mac=_mac_for(vm_id),
        guest_ip=str(rec["guest_ip"]),
        prefix_len=int(rec["prefix_len"]),
        gateway=str(rec["gateway"]),
        dns=[],
        host_ip=host_ip,
        netns_exec=(),
        forwards=forwards,
        _rec=rec,
    )
    rec.update(tap=handle.tap, mac=handle.mac)
    try:
        if mode == "rootless":
            _setup_rootless(handle, workdir, userns=not root)
        else:
            _setup_bridged(handle)
        _save_lease(handle)
    except BaseException as e:
        handle.teardown()
        if isinstance(e, FcvmError):
            raise
        if isinstance(e, OSError):
            raise FcvmError(f"network setup failed: {e}") from e
        raise
    _log.info(
        "net %s: %s guest %s/%s gw %s host %s forwards %s",
        vm_id, mode, handle.guest_ip, handle.prefix_len, handle.gateway, handle.host_ip,
        ",".join(f.spec() for f in forwards) or "-",
    )  # fmt: skip
    return handle


def _save_lease(h: NetHandle) -> None:
    with Leases(Path(str(h._rec["net_dir"]))) as leases:
        leases.put(h.vm_id, h._rec)


def _reap_stale(leases: Leases) -> None:
    for vm_id, rec in list(leases.leases.items()):
        owner = rec.get("owner") or [0, None]
        if alive(owner[0], owner[1]):
            continue
        _log.info("net: reaping the network of VM %s (its fcvm process is gone)", vm_id)
        try:
            _undo_unlocked(rec)
            _undo_locked(rec, leases)
        except Exception as e:
            _log_ignore(f"reaping {vm_id}", e)
        leases.drop(vm_id)


def _ensure_ip_forward() -> None:
    """Bridged VMs reach the outside only if the host forwards IPv4.

    Like podman and docker we switch it on (bridged mode is explicitly asked for and is
    useless without it) and say so once; we leave it on at teardown, since other VMs or
    containers may rely on it by then."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if _read(str(path)) == "1":
        return
    try:
        path.write_text("1\n")
    except OSError as e:
        raise FcvmError(
            f"IPv4 forwarding is off and cannot be enabled ({e.strerror})",
            hint="sysctl -w net.ipv4.ip_forward=1",
        ) from None
    _log.warning("enabled net.ipv4.ip_forward (was 0) for bridged networking")


def _start_holder(h: NetHandle, userns: bool) -> subprocess.Popen[bytes]:
    holder = _spawn_holder(userns)
    h._children.append(holder)
    assert holder.stdin is not None
    h._keep_fds.append(os.dup(holder.stdin.fileno()))  # non-inheritable, like the original
    holder.stdin.close()
    h._rec["holder"] = [holder.pid, start_time(holder.pid)]
    h._rec["userns"] = userns
    _save_lease(h)  # from here a killed fcvm leaves a lease naming the holder
    h.netns_exec = _nsenter(holder.pid, userns)
    return holder


def _setup_rootless(h: NetHandle, workdir: Path, *, userns: bool) -> None:
    rec = h._rec
    holder = _start_holder(h, userns)
    _ns_batch(h.netns_exec, _bridge_lines("slirp0", True), "cannot set up the VM namespace")

    ipv6 = _host_has_ipv6()
    api = _api_socket_path(workdir, h.vm_id)
    api.unlink(missing_ok=True)
    rec["api_socket"] = str(api)
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    h._keep_fds.append(exit_w)
    cmd: list[str] = []
    if userns:
        # run slirp4netns as root of the VM's user namespace (still in the host's
        # network namespace) so its sandbox may make a mount namespace
        cmd += [h.netns_exec[0], f"--target={holder.pid}", "--user", "--preserve-credentials", "--"]
    cmd += [
        need_tool("slirp4netns", "rootless networking"),
        f"--ready-fd={ready_w}",
        f"--exit-fd={exit_r}",
        f"--api-socket={api}",
        f"--mtu={MTU}",
        f"--cidr={SLIRP_CIDR}",
        "--enable-sandbox",
        "--enable-seccomp",
        "--netns-type=path",
    ]
    if userns:
        cmd.append(f"--userns-path=/proc/{holder.pid}/ns/user")
    if ipv6:
        cmd.append("--enable-ipv6")
    cmd += [f"/proc/{holder.pid}/ns/net", "slirp0"]
    logf = workdir / "slirp4netns.log"
    try:
        with open(logf, "ab") as out:
            slirp = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(ready_w, exit_r),
                start_new_session=True,
            )
    finally:
        os.close(ready_w)
        os.close(exit_r)
    h._children.append(slirp)
    rec["slirp"] = [slirp.pid, start_time(slirp.pid)]
    try:
        ready, _, _ = select.select([ready_r], [], [], 10)
        ok = bool(ready) and os.read(ready_r, 1) == b"1"
    finally:
        os.close(ready_r)
    if not ok:
        tail = ""
        try:
            lines = [x for x in logf.read_text(errors="replace").splitlines() if x.strip()]
            tail = lines[-1] if lines else ""
        except OSError:
            pass
        raise FcvmError(f"slirp4netns did not start: {tail or 'no reply'}")
    h.dns = [SLIRP_DNS]
    if ipv6:
        h.guest_ip6, h.prefix_len6, h.gateway6 = SLIRP_GUEST6, 64, SLIRP_GW6
        h.dns.append(SLIRP_DNS6)
    for f in h.forwards:
        try:
            reply = _slirp_api(
                str(api),
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
    _fill_rec(h)


def _setup_bridged(h: NetHandle) -> None:
    rec = h._rec
    holder = _start_holder(h, False)
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
    _ns_batch(h.netns_exec, _bridge_lines("veth0", False), "cannot set up the VM namespace")
    h.dns = _host_dns()
    if not h.dns:
        _log.warning("net: no non-loopback DNS server in /etc/resolv.conf; guest has no DNS")
    with Leases(Path(str(rec["net_dir"]))) as leases:
        rec["iptables"] = True
        leases.put(h.vm_id, rec)
        iptables.add_vm(str(rec["tag"]), veth, str(rec["subnet"]), h.guest_ip, h.forwards)
    _fill_rec(h)


def _fill_rec(h: NetHandle) -> None:
    h._rec.update(
        dns=h.dns,
        netns_exec=list(h.netns_exec),
        guest_ip6=h.guest_ip6,
        gateway6=h.gateway6,
        mtu=h.mtu,
    )
