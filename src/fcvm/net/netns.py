"""The VM's network namespace: the holder process that keeps it, nsenter into it, br0 + tap0.

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

The holder is also how other processes enter the namespaces (netns_exec). fcvm
itself keeps an fd open on each namespace (`NsFds`): they die with fcvm like the
pipes, and they let a helper that died be replaced inside the very same namespaces
(watch.py) even when no holder is left to nsenter through.
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
    """fcvm's own fds on the VM's namespaces (user: -1 when there is no user namespace).

    The paths are /proc/self/fd/N: valid in a child that inherits the fds (pass_fds)."""

    net: int
    user: int = -1

    @classmethod
    def of(cls, pid: int, userns: bool) -> NsFds:
        net = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC) if userns else -1
        except OSError:
            os.close(net)
            raise
        return cls(net, user)

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.net,) if self.user < 0 else (self.net, self.user)

    @property
    def net_path(self) -> str:
        return f"/proc/self/fd/{self.net}"

    @property
    def user_path(self) -> str:
        return f"/proc/self/fd/{self.user}"

    def enter_user(self) -> list[str]:
        """An nsenter prefix into the user namespace only (slirp4netns stays in the
        host's network namespace); empty without a user namespace."""
        if self.user < 0:
            return []
        nsenter = need_tool("nsenter", "entering the VM's namespace")
        return [nsenter, f"--user={self.user_path}", "--preserve-credentials", "--"]

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.net = self.user = -1


def holder_cmd(userns: bool) -> list[str]:
    """A holder making new namespaces."""
    cmd = [need_tool("unshare", "network namespaces")]
    if userns:
        cmd += ["--user", "--map-root-user"]
    return [*cmd, "--net", "--", "/bin/sh", "-c", _HOLD]


def replacement_holder_cmd(ns: NsFds) -> list[str]:
    """A holder entering the existing namespaces through fcvm's fds (pass ns.fds)."""
    cmd = [need_tool("nsenter", "entering the VM's namespace"), f"--net={ns.net_path}"]
    if ns.user >= 0:
        cmd += [f"--user={ns.user_path}", "--preserve-credentials"]
    return [*cmd, "--", "/bin/sh", "-c", _HOLD]


def launch_holder(cmd: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start a holder; it says "ready" on stdout once in its namespaces."""
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        start_new_session=True,  # a Ctrl-C at the terminal is fcvm's to handle
    )


def spawn_holder(userns: bool) -> subprocess.Popen[bytes]:
    p = launch_holder(holder_cmd(userns))
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


def nsenter_prefix(pid: int, userns: bool) -> tuple[str, ...]:
    pre = [need_tool("nsenter", "entering the VM's namespace"), f"--target={pid}", "--net"]
    if userns:
        # keep our uid/gids (e.g. the kvm group); the mapped uid is root in the userns
        pre += ["--user", "--preserve-credentials"]
    return (*pre, "--")


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


def keep_stdin(p: subprocess.Popen[bytes]) -> int:
    """Our end of the holder's stdin, kept (non-inheritable): EOF on it ends the holder."""
    assert p.stdin is not None
    fd = os.dup(p.stdin.fileno())
    p.stdin.close()
    return fd


def start_holder(h: NetHandle, userns: bool) -> subprocess.Popen[bytes]:
    """Make h's namespaces (their holder is then in h's record and lease) and set
    h.netns_exec to enter them."""
    holder = spawn_holder(userns)
    h.add_helper("holder", holder, keep_stdin(holder))
    h._rec["holder"] = [holder.pid, start_time(holder.pid)]
    h._rec["userns"] = userns
    h.save_lease()  # from here a killed fcvm leaves a lease naming the holder
    h._ns = NsFds.of(holder.pid, userns)
    h.netns_exec = nsenter_prefix(holder.pid, userns)
    return holder
