"""On-disk layout of one snapshot: ``paths.snapshot_dir(NAME)/``.

    meta.json     SnapshotMeta (below), written last: a directory without it is incomplete
    memory        guest memory, the regions laid end to end (sparse: holes are zero pages)
    vmstate       the VMM's device/vCPU state file
    disk-<id>     one file per writable drive, copied (reflink) while the VM was paused
    workingset    first-touch working set recorded by the page server (snapshot/workingset.py)
    lock          flock'ed shared by every VM using the snapshot, exclusively to remove it
    last-used     its mtime: when a VM last started from it (for pruning, LRU)

Snapshots are written in a temporary directory (``.tmp-NAME-PID``) and renamed into
place complete, so a name that exists is whole. Names are short and path-safe because
the page server's socket path (``paths.serve_dir()/NAME.sock``) must fit in 107 bytes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fcvm import paths
from fcvm.errors import FcvmError
from fcvm.fsutil import atomic_write

META_FILE = "meta.json"
MEMORY_FILE = "memory"
VMSTATE_FILE = "vmstate"
WORKINGSET_FILE = "workingset"
LOCK_FILE = "lock"
LAST_USED_FILE = "last-used"
DISK_PREFIX = "disk-"
TMP_PREFIX = ".tmp-"
META_VERSION = 2

KIND_PRESTART = "prestart"  # image cache: the container created, held at its gate
KIND_STARTUP = "startup"  # image cache: the container running and healthy
KIND_NAMED = "named"  # `fcvm snapshot create --tag NAME`
CACHE_KINDS = (KIND_PRESTART, KIND_STARTUP)
CACHE_PREFIX = "cache-"  # the image cache's entries are cache-<key> (snapshot/cache.py)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SnapshotError(FcvmError):
    """A snapshot is missing, incomplete or malformed."""


class SnapshotNotFound(SnapshotError):
    """No snapshot of that name."""


def validate_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise SnapshotError(
            f"invalid snapshot name {name!r}",
            hint="1-64 characters: letters, digits, '_', '.', '-'; starting with a letter or digit",
        )
    return name


def validate_new_name(name: str) -> str:
    """A name for `fcvm snapshot create`: valid, and not one the image cache could take
    (it replaces whatever holds its own name)."""
    validate_name(name)
    if name.startswith(CACHE_PREFIX):
        raise SnapshotError(
            f"invalid snapshot name {name!r}: names starting with {CACHE_PREFIX!r} belong "
            "to the image cache",
            hint="pick another name",
        )
    return name


@dataclass
class SnapshotMeta:
    """meta.json: what the snapshot is and how to restore it."""

    name: str
    version: int = META_VERSION
    created: float = field(default_factory=time.time)
    vmm: str = ""  # "firecracker" | "qemu"
    memory_size: int = 0  # bytes in the memory file
    mem_mib: int = 0
    cpus: int = 0
    page_size: int = 4096  # guest memory page size (2 MiB with huge pages)
    plan_key: str = ""  # the cache key (image cache kinds), its hex digest
    source_vm: str = ""  # vm_id it was taken from, if any
    disks: dict[str, str] = field(default_factory=dict)  # drive id -> file name in the dir
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = KIND_NAMED
    key_parts: dict[str, Any] = field(default_factory=dict)  # what the key was made of
    # Identity of the files, checked before a restore: a changed, truncated or foreign
    # snapshot is never restored.
    state_size: int = 0
    state_sha256: str = ""
    memory_mtime_ns: int = 0
    vmm_version: str = ""
    accel: str = ""
    # The VM to rebuild around it (MachineSpec's hardware) and what runs in it.
    machine: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotMeta:
        """TypeError for a field of the wrong type (a hand-edited "created": "yesterday"
        made `fcvm snapshots` fail as a whole)."""
        fields = cls.__dataclass_fields__
        for key, value in data.items():
            wanted = _JSON_TYPES.get(str(fields[key].type).split("[")[0]) if key in fields else None
            if wanted is not None and not isinstance(value, wanted):
                raise TypeError(f"{key} is {type(value).__name__}, not {fields[key].type}")
        return cls(**{k: v for k, v in data.items() if k in fields})


# SnapshotMeta's field types (annotations are strings here) -> what JSON must hold.
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "float": (int, float), "dict": dict,
}  # fmt: skip


@dataclass(frozen=True)
class SnapshotLayout:
    """The files of one snapshot directory."""

    name: str
    dir: Path

    @property
    def meta(self) -> Path:
        return self.dir / META_FILE

    @property
    def memory(self) -> Path:
        return self.dir / MEMORY_FILE

    @property
    def vmstate(self) -> Path:
        return self.dir / VMSTATE_FILE

    @property
    def workingset(self) -> Path:
        return self.dir / WORKINGSET_FILE

    @property
    def lock(self) -> Path:
        return self.dir / LOCK_FILE

    @property
    def last_used(self) -> Path:
        return self.dir / LAST_USED_FILE

    def disk(self, drive_id: str) -> Path:
        return self.dir / f"{DISK_PREFIX}{drive_id}"

    def exists(self) -> bool:
        return self.meta.is_file()


def layout(name: str) -> SnapshotLayout:
    return SnapshotLayout(name=validate_name(name), dir=paths.snapshot_dir(name))


def save_meta(snap: SnapshotLayout, meta: SnapshotMeta) -> None:
    """Atomically write meta.json (temp file, fsync, rename); creates the directory."""
    atomic_write(snap.meta, json.dumps(meta.to_json(), indent=1))


def load_meta(snap: SnapshotLayout) -> SnapshotMeta:
    try:
        data = json.loads(snap.meta.read_text())
    except FileNotFoundError:
        raise SnapshotNotFound(f"no snapshot named {snap.name!r}") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {snap.name!r}: unreadable {META_FILE}: {exc}") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot {snap.name!r}: {META_FILE} is not a JSON object")
    try:
        return SnapshotMeta.from_json(data)
    except TypeError as exc:
        raise SnapshotError(f"snapshot {snap.name!r}: bad {META_FILE}: {exc}") from None


def open_snapshot(name: str) -> tuple[SnapshotLayout, SnapshotMeta]:
    """The layout and metadata of an existing snapshot (SnapshotNotFound otherwise)."""
    snap = layout(name)
    return snap, load_meta(snap)


def list_snapshots() -> list[tuple[SnapshotLayout, SnapshotMeta | None]]:
    """Every snapshot directory, with its metadata (None when incomplete or unreadable)."""
    root = paths.snapshots_dir()
    if not root.is_dir():
        return []
    out: list[tuple[SnapshotLayout, SnapshotMeta | None]] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not _NAME_RE.fullmatch(entry.name):
            continue  # (.tmp-* directories are snapshots being written)
        snap = SnapshotLayout(name=entry.name, dir=entry)
        try:
            meta: SnapshotMeta | None = load_meta(snap)
        except SnapshotError:
            meta = None
        out.append((snap, meta))
    return out
