"""The image cache: snapshots keyed by everything the guest has seen before they were taken.

A run computes its key (`key_of`: the canonical JSON of its parts, hashed), looks it up
(`lookup`: only a complete snapshot whose files are exactly as written and whose
recorded VMM, accelerator and key match is returned, with a lease on it), and if there
is none, the first run of the key writes one (`creator`: one writer per key; another
run of the same key meanwhile boots cold and writes nothing). Entries live beside
named snapshots in BASE/snapshots, named ``cache-<key>``, with kind prestart or startup.

The cache is bounded (`limit_bytes`: $FCVM_SNAPSHOT_CACHE_MAX, else `snapshot_cache_max`
in config.toml, else 10G); `prune` removes least recently used entries until it fits,
never one in use. `FCVM_NO_SNAPSHOT=1` (or --no-snapshot) turns the cache off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcvm import log, paths
from fcvm.errors import UsageError
from fcvm.snapshot import store
from fcvm.snapshot.layout import (
    CACHE_KINDS,
    CACHE_PREFIX,
    META_VERSION,
    SnapshotError,
    SnapshotLayout,
    SnapshotMeta,
    layout,
    list_snapshots,
    load_meta,
)

logger = log.get("snapshot.cache")

PREFIX = CACHE_PREFIX
DEFAULT_LIMIT = 10 << 30
KEY_CHARS = 24


def disabled() -> bool:
    return os.environ.get("FCVM_NO_SNAPSHOT", "").lower() in ("1", "yes", "true", "on")


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()  # fmt: skip


def name_of(key: str) -> str:
    return f"{PREFIX}{key[:KEY_CHARS]}"


@dataclass
class Entry:
    """A usable cache entry, held in use until `lease.release()`."""

    layout: SnapshotLayout
    meta: SnapshotMeta
    lease: store.Lease


def lookup(kind: str, key: str, expect: dict[str, str]) -> Entry | None:
    """The entry of `key`, if it can be restored: complete, of this kind, its files as
    written, and `expect` (vmm, vmm_version, accel) as recorded. Anything else is
    reported at info level and removed (when not in use): the run then boots cold."""
    snap = layout(name_of(key))
    if not snap.dir.is_dir():
        return None
    try:
        meta = load_meta(snap)
        why = _mismatch(meta, kind, key, expect) or store.why_unusable(snap, meta)
    except SnapshotError as exc:
        meta, why = None, str(exc)
    if why is not None:
        logger.info("cached snapshot %s is unusable: %s; removing it and booting cold",
                    snap.name, why)  # fmt: skip
        with contextlib.suppress(SnapshotError):
            store.remove(snap.name)
        return None
    assert meta is not None
    lease = store.lease(snap.name)
    if lease is None:
        return None  # removed meanwhile
    return Entry(snap, meta, lease)


def _mismatch(meta: SnapshotMeta, kind: str, key: str, expect: dict[str, str]) -> str | None:
    if meta.version != META_VERSION:
        return f"written by another fcvm version ({meta.version})"
    if meta.kind != kind or meta.plan_key != key:
        return f"it is a {meta.kind} snapshot of key {meta.plan_key[:12]}, not {kind} {key[:12]}"
    for field_name, want in expect.items():
        have = str(getattr(meta, field_name, ""))
        if have != want:
            return f"its {field_name} is {have!r}, not {want!r} as here"
    return None


@contextlib.contextmanager
def creator(key: str) -> Iterator[store.Writer | None]:
    """A writer for key's entry, or None when another run is writing it right now."""
    name = name_of(key)
    root = paths.snapshots_dir()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f".{name}.create"
    fd = _lock_creation(lock)
    if fd is None:
        logger.info("another run is writing snapshot %s; not writing it too", name)
        yield None
        return
    try:
        if layout(name).meta.is_file():
            yield None  # written while we booted
            return
        with store.writer(name) as w:
            yield w
    finally:
        lock.unlink(missing_ok=True)  # (still held: nobody locks this file any more)
        os.close(fd)


def _lock_creation(lock: Path) -> int | None:
    """An fd holding lock's flock, or None while another run holds it. The holder
    unlinks the file when it is done (no lock file per key is left behind), so a lock
    won on a file that is no longer at that path is retried on the new one."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:
            pass
        os.close(fd)


def parse_size(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
    if not m:
        raise UsageError(f"malformed size {value!r}: expected e.g. 500M or 10G")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def limit_bytes() -> int:
    """The cache's size bound: $FCVM_SNAPSHOT_CACHE_MAX, else `snapshot_cache_max` in
    config.toml, else 10G. A malformed value is a UsageError that says where it is."""
    env = os.environ.get("FCVM_SNAPSHOT_CACHE_MAX")
    if env:
        return _size_setting(env, "FCVM_SNAPSHOT_CACHE_MAX")
    cfg = paths.config_file()
    try:
        import tomllib

        with open(cfg, "rb") as f:
            value = tomllib.load(f).get("snapshot_cache_max")
    except (OSError, ValueError):
        return DEFAULT_LIMIT  # (no config; an unreadable one is reported where it is read)
    if value is None:
        return DEFAULT_LIMIT
    return _size_setting(str(value), f"snapshot_cache_max in {cfg}")


def _size_setting(value: str, where: str) -> int:
    try:
        return parse_size(value)
    except UsageError:
        raise UsageError(f"malformed {where}: {value!r} (expected e.g. 500M or 10G)") from None


@dataclass
class Listed:
    layout: SnapshotLayout
    meta: SnapshotMeta | None
    size: int
    last_used: float
    in_use: bool
    served_by: int | None = None  # pid of the page server serving it (fcvm snapshot serve)

    def to_json(self) -> dict[str, Any]:
        m = self.meta
        return {
            "name": self.layout.name,
            "kind": m.kind if m else "incomplete",
            "key": m.plan_key if m else "",
            "size_bytes": self.size,
            "created": m.created if m else None,
            "last_used": self.last_used,
            "in_use": self.in_use,
            "vmm": m.vmm if m else "",
            "image": m.workload.get("image", "") if m else "",
            "memory_bytes": _size(self.layout.memory),
            "served_by_pid": self.served_by,
        }


def _size(path: os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def page_servers() -> dict[str, int]:
    """Snapshot name -> pid of the live page server serving it (fcvm snapshot serve)."""
    from fcvm import state

    return {str(r.extra.get("snapshot")): r.pid for r in state.list_live() if r.kind == "serve"}


def listing() -> list[Listed]:
    servers = page_servers()
    out = []
    for snap, meta in list_snapshots():
        try:
            used = snap.last_used.stat().st_mtime
        except OSError:
            used = meta.created if meta else 0.0
        out.append(Listed(snap, meta, store.size_on_disk(snap.dir), used, store.in_use(snap),
                          servers.get(snap.name)))  # fmt: skip
    return out


def prune(
    *,
    max_bytes: int | None = None,
    older_than: float | None = None,
    kinds: tuple[str, ...] = CACHE_KINDS,
) -> list[str]:
    """Remove cache entries (of kinds) unused for older_than seconds, then the least
    recently used ones until all of them fit in max_bytes; and always those made with
    guest assets that are gone (after `fcvm setup` rebuilt them, no run can match them
    again). Never one in use. The names removed."""
    entries = [e for e in listing() if e.meta is None or e.meta.kind in kinds]
    # (an entry larger than the whole bound can never stay: it goes first, else older
    # entries would be removed for nothing before it)
    entries.sort(key=lambda e: (max_bytes is None or e.size <= max_bytes, e.last_used))
    removed: list[str] = []
    now = time.time()
    total = sum(e.size for e in entries)
    for e in entries:
        too_old = older_than is not None and now - e.last_used > older_than
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big or _orphaned(e.meta)) or e.in_use:
            continue
        try:
            store.remove(e.layout.name)
        except SnapshotError:
            continue
        total -= e.size
        removed.append(e.layout.name)
    return removed


def bytes_needed(mem_mib: int, disks: Iterable[Path]) -> int:
    """At most what a snapshot of a VM takes on disk: all of its memory (the file is
    sparse, usually far less), its disks' allocated blocks (copies, unless reflinked),
    and a little for the device state."""
    total = (mem_mib << 20) + (16 << 20)
    for disk in disks:
        with contextlib.suppress(OSError):
            total += os.stat(disk).st_blocks * 512
    return total


def make_room(needed: int) -> tuple[bool, int]:
    """Before writing an entry of up to `needed` bytes: whether the snapshot directory's
    filesystem has room, after removing least recently used cache entries (never one
    in use, never a named snapshot) if that makes enough; nothing is removed when even
    all of them would not. Also the bytes free then."""
    root = paths.snapshots_dir()
    root.mkdir(parents=True, exist_ok=True)  # (a first snapshot: nothing there yet)
    free = _free_bytes(root)
    if free >= needed:
        return True, free
    evictable = [e for e in listing()
                 if e.meta is not None and e.meta.kind in CACHE_KINDS and not e.in_use]  # fmt: skip
    if free + sum(e.size for e in evictable) < needed:
        return False, free
    for e in sorted(evictable, key=lambda e: e.last_used):
        try:
            store.remove(e.layout.name)
        except SnapshotError:
            continue
        logger.info("removed snapshot %s to make room for a new one", e.layout.name)
        free = _free_bytes(root)
        if free >= needed:
            return True, free
    return False, free


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _orphaned(meta: SnapshotMeta | None) -> bool:
    assets = meta.key_parts.get("assets") if meta is not None else None
    if not isinstance(assets, list):
        return False
    return not all((paths.assets_dir() / str(name)).exists() for name in assets)


def enforce_limit(max_bytes: int | None = None) -> list[str]:
    """After writing an entry: keep the cache within its bound (max_bytes, else
    limit_bytes()), least recently used first."""
    removed = prune(max_bytes=limit_bytes() if max_bytes is None else max_bytes)
    if removed:
        logger.info("snapshot cache over its bound: removed %s", ", ".join(removed))
    return removed
