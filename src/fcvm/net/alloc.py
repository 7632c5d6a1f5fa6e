"""Network allocation: per-VM loopback addresses and bridged subnets, under a file lock.

All of it lives in paths.net_dir():

    net/leases.lock   flock held while leases.json is read-modified-written
    net/leases.json   {"version": 1, "leases": {vm_id: <NetHandle.record()>}}

A lease is the VM's full teardown record, written before anything is created and
updated as pieces appear, so a lease whose owner process died (kill -9 of fcvm) holds
everything needed to undo it; the next allocation reaps such leases first.

The pure functions here (pick_loopback, pick_subnet, port_conflict) are unit-tested.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from fcvm.errors import FcvmError
from fcvm.fsutil import atomic_write
from fcvm.net.publish import PortForward

# Rootless: every VM gets its own address in 127.77.0.0/16 (all of 127/8 is local on
# Linux, so binding needs no address to be added and nothing to remove later).
LOOPBACK_POOL = ipaddress.IPv4Network("127.77.0.0/16")
# Bridged: one /30 per VM (.1 host end of the veth = gateway, .2 the guest).
BRIDGE_POOL = "10.213.0.0/16"
BRIDGE_PREFIX = 30

Record = dict[str, Any]


def bridge_pool() -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(os.environ.get("FCVM_BRIDGE_POOL") or BRIDGE_POOL)
    except ValueError as e:
        raise FcvmError(f"invalid FCVM_BRIDGE_POOL: {e}") from None


def pick_loopback(used: Iterable[str], pool: ipaddress.IPv4Network = LOOPBACK_POOL) -> str:
    """Lowest free address of the pool, skipping .0 and .255 of each /24 (less surprising)."""
    taken = set(used)
    for addr in pool.hosts():
        last = int(addr) & 0xFF
        if last in (0, 255):
            continue
        if str(addr) not in taken:
            return str(addr)
    raise FcvmError(f"no free loopback address left in {pool}")


def pick_subnet(
    pool: ipaddress.IPv4Network,
    used: Iterable[ipaddress.IPv4Network],
    avoid: Iterable[ipaddress.IPv4Network] = (),
    prefix: int = BRIDGE_PREFIX,
) -> tuple[int, ipaddress.IPv4Network]:
    """(index, subnet): the first /prefix of the pool overlapping neither a lease nor
    one of the host's own routes/addresses (`avoid`)."""
    if prefix < pool.prefixlen or prefix > 30:
        raise FcvmError(f"cannot carve /{prefix} subnets out of {pool}")
    busy = list(used)
    host = [n for n in avoid if n.prefixlen > 0]  # a default route overlaps everything
    for index, net in enumerate(pool.subnets(new_prefix=prefix)):
        if any(net.overlaps(b) for b in busy) or any(net.overlaps(h) for h in host):
            continue
        return index, net
    raise FcvmError(f"no free /{prefix} subnet left in {pool} (set FCVM_BRIDGE_POOL)")


def _ip_overlap(a: str, b: str) -> bool:
    wild = ("0.0.0.0", "::")
    return a == b or a in wild or b in wild


def port_conflict(
    new: Iterable[PortForward],
    leases: dict[str, Record],
    *,
    me: str = "",
    label: Callable[[str], str] = lambda vm_id: f"VM {vm_id}",
) -> str | None:
    """A message if one of `new` collides with a forward another lease holds (the
    holder named by label(vm_id))."""
    for vm_id, rec in leases.items():
        if vm_id == me:
            continue
        for raw in rec.get("forwards", []):
            old = PortForward.from_json(raw)
            for fwd in new:
                if (
                    fwd.proto == old.proto
                    and fwd.host_port == old.host_port
                    and _ip_overlap(fwd.host_ip, old.host_ip)
                ):
                    return (
                        f"host port {fwd.host_ip}:{fwd.host_port}/{fwd.proto} is already "
                        f"published by {label(vm_id)}"
                    )
    return None


class Leases:
    """`with Leases(dir) as l:` holds the flock; writes back atomically if changed."""

    def __init__(self, net_dir: Path) -> None:
        self.dir = net_dir
        self.leases: dict[str, Record] = {}
        self._fd = -1
        self._dirty = False

    def __enter__(self) -> Leases:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.dir / "leases.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as e:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            raise FcvmError(f"cannot lock {self.dir}/leases.lock: {e.strerror}") from None
        try:
            data = json.loads((self.dir / "leases.json").read_text())
            leases = data.get("leases", {}) if isinstance(data, dict) else {}
            self.leases = {str(k): v for k, v in leases.items() if isinstance(v, dict)}
        except FileNotFoundError:
            self.leases = {}
        except (OSError, ValueError):
            self.leases = {}  # unreadable: start afresh rather than block every VM
            self._dirty = True
        return self

    def put(self, vm_id: str, rec: Record) -> None:
        self.leases[vm_id] = rec
        self._dirty = True

    def drop(self, vm_id: str) -> None:
        if self.leases.pop(vm_id, None) is not None:
            self._dirty = True

    def _save(self) -> None:
        body = json.dumps({"version": 1, "leases": self.leases}, indent=1, sort_keys=True)
        atomic_write(self.dir / "leases.json", body)

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._dirty:
                self._save()
        finally:
            os.close(self._fd)
            self._fd = -1
