"""VM records: one JSON file per running VM, written atomically under a lock.

A record names the fcvm process that owns the VM (pid plus its kernel start time,
so a recycled pid is never mistaken for the owner). A record whose owner is gone is
stale: it is never shown as running, and the next fcvm command reaps it (runs the
record's cleanups and removes the VM directory) - see reap_stale().

This module knows nothing of what a VM holds. Whoever creates something that can
outlive a killed fcvm (network namespaces and iptables rules, a page server's socket)
registers a reaper on the record with `add_reaper(record, function)`; the record
keeps the function's importable name, and reap_stale() calls it with the record.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcvm import log, paths
from fcvm.errors import StateError
from fcvm.fsutil import atomic_write
from fcvm.procstat import stat_fields

_log = log.get("state")

RECORD_FILE = "vm.json"


@dataclass
class VmRecord:
    vm_id: str
    name: str
    kind: str = "vm"  # "vm" or "serve" (a snapshot page server)
    pid: int = 0  # the fcvm process that owns it
    pid_start: int = 0  # that process's start time (clock ticks since boot)
    vmm: str = ""
    vmm_pid: int | None = None
    image: str = ""
    status: str = "starting"  # starting | booting | running
    health: str = ""  # "" until the container runs; starting (its --health-check not
    # passed yet), healthy, unhealthy (from the agent)
    created: float = field(default_factory=time.time)
    cpus: int = 0
    mem_mib: int = 0
    network: dict[str, Any] = field(default_factory=dict)  # net.NetHandle.record()
    extra: dict[str, Any] = field(default_factory=dict)
    # "module:function" of each reaper registered with add_reaper, in order.
    reapers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def process_start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (with the pid, a process identity
    that survives pid reuse), or None if it is gone or a zombie."""
    fields = stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def owner_alive(record: VmRecord) -> bool:
    return record.pid > 0 and process_start_time(record.pid) == record.pid_start


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Exclusive lock over the set of records (create/remove/name checks)."""
    vms = paths.vms_dir()
    vms.mkdir(parents=True, exist_ok=True)
    fd = os.open(vms / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _record_path(vm_id: str) -> Path:
    return paths.vm_dir(vm_id) / RECORD_FILE


def write_record(record: VmRecord) -> None:
    """Atomically replace the record file (write temp, fsync, rename)."""
    atomic_write(_record_path(record.vm_id), json.dumps(record.to_json(), indent=1))


def read_record(vm_id: str) -> VmRecord | None:
    try:
        return VmRecord.from_json(json.loads(_record_path(vm_id).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _all_records() -> list[VmRecord]:
    vms = paths.vms_dir()
    if not vms.is_dir():
        return []
    out = []
    for entry in sorted(vms.iterdir()):
        if entry.is_dir():
            rec = read_record(entry.name)
            if rec is not None:
                out.append(rec)
    return out


def new_vm_id() -> str:
    return os.urandom(4).hex()


def create(record: VmRecord) -> VmRecord:
    """Register a new VM owned by this process; names are unique among live VMs."""
    record.pid = os.getpid()
    record.pid_start = process_start_time(record.pid) or 0
    with locked():
        for other in _all_records():
            if other.name == record.name and owner_alive(other):
                raise StateError(f"a VM named {record.name!r} is already running (pid {other.pid})")
        write_record(record)
    return record


def update(record: VmRecord, **changes: Any) -> None:
    for key, value in changes.items():
        setattr(record, key, value)
    write_record(record)


Reaper = Callable[["VmRecord"], None]


def add_reaper(record: VmRecord, reaper: Reaper) -> None:
    """After a killed owner, reap_stale() will call reaper(record) (before removing the
    VM directory). The reaper must be a module-level function (of fcvm, for another
    process to find it), idempotent, and never raise for something already gone.
    Saves the record."""
    ref = f"{reaper.__module__}:{reaper.__qualname__}"
    if not reaper.__qualname__.isidentifier():
        raise ValueError(f"a reaper must be a module-level function, not {ref}")
    if ref not in record.reapers:
        record.reapers.append(ref)
        write_record(record)


def _run_reaper(ref: str, record: VmRecord) -> None:
    module_name, _, func_name = ref.partition(":")
    # A record is data on disk: import nothing but fcvm's own modules because of it.
    if not module_name.startswith("fcvm.") and module_name not in sys.modules:
        _log.warning("record %s names a foreign reaper %r; skipped", record.vm_id, ref)
        return
    try:
        getattr(importlib.import_module(module_name), func_name)(record)
    except Exception as exc:
        _log.warning("reaping %s: %s failed: %s", record.name, ref, exc)


def remove(vm_id: str) -> None:
    """Delete the VM's directory (record, sockets, logs)."""
    with locked():
        shutil.rmtree(paths.vm_dir(vm_id), ignore_errors=True)


def list_live() -> list[VmRecord]:
    """Records whose owner process is alive. Stale ones are not shown (nor reaped here)."""
    return [r for r in _all_records() if owner_alive(r)]


def find(*, name: str | None = None, pid: int | None = None) -> VmRecord:
    """The live VM by name or owner pid (a page server's record is refused: it has no
    VM to run commands in or snapshot; so is a pid that owns several VMs, a program
    using the Python API: which one is meant must be said)."""
    live = list_live()
    if name is None and pid is not None:
        owned = sorted(r.name for r in live if r.pid == pid and r.kind != "serve")
        if len(owned) > 1:
            raise StateError(f"pid {pid} owns {len(owned)} VMs ({', '.join(owned)})",
                             hint="name the VM instead (fcvm ls shows their names)")  # fmt: skip
    for rec in live:
        if (name is not None and rec.name == name) or (pid is not None and rec.pid == pid):
            if rec.kind == "serve":
                snapshot = rec.extra.get("snapshot", "")
                raise StateError(f"{rec.name!r} is the page server of snapshot {snapshot!r}, "
                                 "not a VM (its clones are VMs)")  # fmt: skip
            return rec
    what = f"named {name!r}" if name is not None else f"with pid {pid}"
    raise StateError(f"no running VM {what}")


def reap_stale() -> list[VmRecord]:
    """Remove what dead fcvm processes left behind; returns the reaped records."""
    reaped = []
    with locked():
        stale = [r for r in _all_records() if not owner_alive(r)]
        for rec in stale:
            _kill_leftover_vmm(rec)
            for ref in reversed(rec.reapers):  # undo in the reverse order of creation
                _run_reaper(ref, rec)
            shutil.rmtree(paths.vm_dir(rec.vm_id), ignore_errors=True)
            reaped.append(rec)
    return reaped


def _kill_leftover_vmm(rec: VmRecord) -> None:
    """A VMM normally dies with fcvm (PDEATHSIG); make sure, checking it is ours."""
    pid = rec.vmm_pid
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if rec.vm_id.encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
