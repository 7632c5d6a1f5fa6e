"""The VM's network namespace: the holder that makes it, fcvm's fds on it, br0 + tap0.

Both layouts (rootless.py, bridged.py) put the VM in a network namespace of its own
(plus a user namespace when rootless and not root), with ``br0`` bridging the VM's
``tap0`` and the layout's uplink (slirp4netns' ``slirp0``, or ``veth0``).

The namespaces are held by a tiny holder process (`unshare ... sh -c 'exec cat'`),
which exits when its stdin pipe reaches EOF, i.e. when the fcvm process that made
it dies for any reason (kill -9 included); slirp4netns exits the same way through
its --exit-fd. A pipe rather than PR_SET_PDEATHSIG because the death signal follows
the creating *thread*, and a runner that calls setup_network from a worker thread
would lose its network when that thread ends. What cannot die with a process
(iptables rules, the lease, a stray veth) is in the record and is removed by
teardown_from_record, by `fcvm gc`, or by the next setup_network (stale leases).

Right after the holder has made them, fcvm opens an fd on each namespace (`NsFds`)
and keeps it until teardown: those fds hold the namespaces too (and die with fcvm
like the pipes), and everything enters the namespaces through them, not through the
holder: netns_exec is `nsenter --net=/proc/<fcvm pid>/fd/N ...` (the VMM is launched
with it), and slirp4netns is given /proc/self/fd/N. So once the network is set up
the holder's death breaks nothing (watch.py reaps it and says so): the VMM and
fcvm's fds keep the namespaces, and a slirp4netns restart or a VMM launched after it
still gets in. The holder stays for what it was made for, and the record names it.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fcvm.errors import FcvmError
from fcvm.net.proc import end_child, need_tool, read_setting, run, start_time

if TYPE_CHECKING:
    from fcvm.net.handle import NetHandle

MTU = 1500
TAP = "tap0"
_HOLD = "echo ready; exec cat >/dev/null"


def userns_hint() -> str:
    """Why unprivileged user namespaces might be off here, and how to allow them."""
    clone = read_setting("/proc/sys/kernel/unprivileged_userns_clone")
    maxns = read_setting("/proc/sys/user/max_user_namespaces")
    aa = read_setting("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
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


@dataclass
class NsFds:
    """fcvm's own fds on the VM's namespaces (user: -1 when there is no user namespace)."""

    net: int
    user: int = -1

    @classmethod
    def of(cls, pid: int, userns: bool) -> NsFds:
        try:
            net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise FcvmError(f"the namespace holder (pid {pid}) is gone: {e.strerror}") from None
        try:
            user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC) if userns else -1
        except OSError as e:
            os.close(net)
            raise FcvmError(f"the namespace holder (pid {pid}) is gone: {e.strerror}") from None
        return cls(net, user)

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.net,) if self.user < 0 else (self.net, self.user)

    # In a child given the fds (pass_fds): /proc/self/fd/N.
    @property
    def net_path(self) -> str:
        return f"/proc/self/fd/{self.net}"

    @property
    def user_path(self) -> str:
        return f"/proc/self/fd/{self.user}"

    def enter_user(self) -> list[str]:
        """An nsenter prefix into the user namespace only, for a child given the fds
        (slirp4netns: it stays in the host's network namespace); [] without one."""
        if self.user < 0:
            return []
        nsenter = need_tool("nsenter", "entering the VM's namespace")
        return [nsenter, f"--user={self.user_path}", "--preserve-credentials", "--"]

    def nsenter_prefix(self) -> tuple[str, ...]:
        """netns_exec: enter the namespaces from any process of ours (or root) while this
        one lives, through this process's fds (/proc/<pid>/fd/N; no fd to pass)."""
        me = os.getpid()
        pre = [
            need_tool("nsenter", "entering the VM's namespace"),
            f"--net=/proc/{me}/fd/{self.net}",
        ]
        if self.user >= 0:
            # keep our uid/gids (e.g. the kvm group); the mapped uid is root in the userns
            pre += [f"--user=/proc/{me}/fd/{self.user}", "--preserve-credentials"]
        return (*pre, "--")

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.net = self.user = -1


def spawn_holder(userns: bool) -> subprocess.Popen[bytes]:
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


def ns_batch(netns_exec: tuple[str, ...], lines: list[str], what: str) -> None:
    run([*netns_exec, "ip", "-batch", "-"], what, input="".join(f"{x}\n" for x in lines))


def bridge_lines(port: str, port_is_tap: bool) -> list[str]:
    """`ip -batch` lines: lo up, br0 bridging tap0 (the VM's) and port (the uplink)."""
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


def start_holder(h: NetHandle, userns: bool) -> subprocess.Popen[bytes]:
    """Make h's namespaces (their holder is then in h's record and lease), open fcvm's
    fds on them and set h.netns_exec to enter them."""
    holder = spawn_holder(userns)
    assert holder.stdin is not None
    h.add_helper("holder", holder, os.dup(holder.stdin.fileno()))  # (non-inheritable)
    holder.stdin.close()
    h._rec["holder"] = [holder.pid, start_time(holder.pid)]
    h._rec["userns"] = userns
    h.save_lease()  # from here a killed fcvm leaves a lease naming the holder
    h._ns = NsFds.of(holder.pid, userns)
    h.netns_exec = h._ns.nsenter_prefix()
    return holder
