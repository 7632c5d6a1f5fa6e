"""The common part of a VM's network: setup_network, NetHandle, teardown_from_record.

setup_network checks what both layouts need, allocates under the lease lock (the
layout picks addresses; published ports are checked here), then builds the layout
(rootless.py, default; bridged.py, root only) in the VM's namespace (netns.py). The
handle's record, kept in the lease as it grows, is what teardown_from_record undoes
from any process, also after kill -9 of fcvm; the next setup_network reaps leases
whose owner died. While the VM runs, NetHandle.check() watches the helpers (watch.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcvm import log, paths
from fcvm.errors import FcvmError
from fcvm.net import bridged, iptables, rootless
from fcvm.net.alloc import Leases, Record, port_conflict
from fcvm.net.netns import MTU, TAP, NsFds
from fcvm.net.proc import (
    alive,
    end_child,
    end_process,
    need_tool,
    read_setting,
    start_time,
    try_run,
)
from fcvm.net.publish import PortForward
from fcvm.net.watch import Helper, Watch

if TYPE_CHECKING:
    from fcvm.state import VmRecord
    from fcvm.vmm.base import NetIface

_log = log.get("fcvm.net")

MODES = ("rootless", "bridged")
RECORD_VERSION = 1
_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
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
    # the helper processes by record key ("holder", "slirp"), each with our end of the
    # pipe whose EOF ends it; fcvm's fds on the VM's namespaces (netns.NsFds)
    _helpers: dict[str, Helper] = field(default_factory=dict, repr=False)
    _ns: NsFds | None = field(default=None, repr=False)
    _watch: Watch | None = field(default=None, repr=False)
    _torn: bool = field(default=False, repr=False)

    def guest_params(self) -> dict[str, str]:
        """What the guest agent configures eth0 from: at boot as fcvm.* kernel parameters,
        after a restore in the identity request (with the MAC, which QEMU's restored
        device state would otherwise keep)."""
        params = {"ip": f"{self.guest_ip}/{self.prefix_len}", "gw": self.gateway,
                  "mtu": str(self.mtu)}  # fmt: skip
        if self.dns:
            params["dns"] = ",".join(self.dns)
        if self.guest_ip6:
            params["ip6"] = f"{self.guest_ip6}/{self.prefix_len6}"
            params["gw6"] = self.gateway6
        return params

    def guest_cmdline(self) -> list[str]:
        """Kernel command-line parameters the guest agent configures eth0 from."""
        return [f"fcvm.{k}={v}" for k, v in self.guest_params().items()]

    def proxy_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        return proxy_env(environ, host_alias=rootless.SLIRP_GW if self.mode == "rootless" else None)

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

    def save_lease(self) -> None:
        """Write the record, as it is now, to the VM's lease."""
        with Leases(Path(str(self._rec["net_dir"]))) as leases:
            leases.put(self.vm_id, self._rec)

    def add_helper(self, key: str, proc: subprocess.Popen[bytes], keep_fd: int) -> None:
        """A helper process the network depends on (ended at teardown, watched by check())."""
        self._helpers[key] = Helper(key, proc, keep_fd)

    def check(self) -> str | None:
        """Called every ~50 ms while the VM runs: None while the network works (a dead
        helper is reaped meanwhile, slirp4netns restarted: watch.py), else one line
        saying what died (the VM is then stopped with it). Never waits for anything."""
        if self._torn:
            return None
        if self._watch is None:
            self._watch = Watch(self)
        return self._watch.check()

    def teardown(self) -> None:
        """Idempotent, never raises: helpers, links, iptables rules, lease, sockets."""
        if self._torn:
            return
        self._torn = True
        if self._watch is not None:
            self._watch.close()
        for helper in self._helpers.values():  # EOF on these ends the holder and slirp4netns
            helper.close_fd()
        for helper in self._helpers.values():
            end_child(helper.proc)
        self._helpers.clear()
        if self._ns is not None:
            self._ns.close()
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


def reap_record(vm: VmRecord) -> None:
    """state.reap_stale()'s reaper for a VM whose owner died: undo its network.

    The VM's record gets its network's copy only once setup_network has returned; an
    owner killed during the setup leaves just the lease (same id), undone from there."""
    rec = vm.network or _dead_lease(vm.vm_id)
    if rec:
        teardown_from_record(rec)


def _dead_lease(vm_id: str) -> Record | None:
    with Leases(paths.net_dir()) as leases:
        rec = leases.leases.get(vm_id)
    if rec is None:
        return None
    owner = rec.get("owner") or [0, None]
    return None if alive(owner[0], owner[1]) else rec


def _latest(record: Record) -> Record | None:
    """The VM's lease, if it is this record's (same owner): newer than a copy of the
    record kept elsewhere (the VM's state record) once a helper has been replaced."""
    vm_id = record.get("vm_id")
    if not vm_id:
        return None
    with Leases(Path(str(record.get("net_dir") or paths.net_dir()))) as leases:
        cur = leases.leases.get(str(vm_id))
    if cur is None or cur.get("owner") != record.get("owner") or cur == record:
        return None
    return cur


def teardown_from_record(record: dict[str, Any]) -> None:
    """Undo a VM's network from its record (also after kill -9 of fcvm). Never raises."""
    try:
        latest = _latest(record)
    except Exception as e:
        latest = None
        _log_ignore("reading the lease", e)
    for rec in (record, latest):
        if rec is None:
            continue
        try:
            _undo_unlocked(rec)
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


def _check_bindable(fwd: PortForward) -> None:
    """Fail now, cleanly, if host_ip:host_port/proto cannot be bound (in use, no right)."""
    e = fwd.bind_error()
    if e is None:
        return
    where = f"{fwd.host_ip}:{fwd.host_port}/{fwd.proto}"
    if e.errno == 98:  # EADDRINUSE
        raise FcvmError(f"cannot publish {where}: host port already in use")
    if e.errno == 13:  # EACCES
        start = read_setting("/proc/sys/net/ipv4/ip_unprivileged_port_start") or "1024"
        raise FcvmError(
            f"cannot publish {where}: ports below {start} need root", hint="use a higher host port"
        )
    raise FcvmError(f"cannot publish {where}: {e.strerror}")


# ---------------------------------------------------------------- setup


def _vm_label(vm_id: str) -> str:
    """A VM as its user knows it: by name (its record's), else by id."""
    from fcvm import state

    record = state.read_record(vm_id)
    return f"VM {record.name!r}" if record is not None and record.name else f"VM {vm_id}"


def setup_network(vm_id: str, mode: str, publish: list[PortForward], *, workdir: Path) -> NetHandle:
    """Build the VM's network. On failure: FcvmError (one line), nothing left behind."""
    if mode not in MODES:
        raise FcvmError(f"unknown network mode {mode!r} (use rootless or bridged)")
    if not _VM_ID.fullmatch(vm_id):
        raise FcvmError(f"invalid VM id {vm_id!r} for networking")
    root = os.geteuid() == 0
    for f in publish:
        if ":" in f.host_ip:  # slirp4netns forwards to the guest's IPv4; DNAT is iptables
            raise FcvmError(f"--publish {f.spec()}: only IPv4 host addresses can be published")
    need_tool("ip", "networking")
    need_tool("unshare", "network namespaces")
    need_tool("nsenter", "entering the VM's namespace")
    layout = rootless if mode == "rootless" else bridged
    layout.check_host(root)

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
        host_ip, forwards = layout.allocate(rec, leases, publish)
        rec["host_ip"] = host_ip
        rec["forwards"] = [f.to_json() for f in forwards]
        conflict = port_conflict(forwards, leases.leases, me=vm_id, label=_vm_label)
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
            rootless.setup(handle, workdir, userns=not root)
        else:
            bridged.setup(handle)
        _fill_rec(handle)
        handle.save_lease()
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


def _fill_rec(h: NetHandle) -> None:
    h._rec.update(
        dns=h.dns,
        netns_exec=list(h.netns_exec),
        guest_ip6=h.guest_ip6,
        gateway6=h.gateway6,
        mtu=h.mtu,
    )
