"""Snapshot storage without a VM: the migration-stream splitter on synthetic streams in
QEMU's format, atomic writers, leases and in-use refusals, validation before restore,
one writer per cache key, LRU pruning, and private disk copies."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fcvm import paths
from fcvm.snapshot import cache, store
from fcvm.snapshot.layout import KIND_PRESTART, SnapshotError, SnapshotMeta, layout, list_snapshots
from fcvm.vmm import qemu_stream as qs
from tests.conftest import fcvm

pytestmark = pytest.mark.unit

BE32, BE64 = struct.Struct(">I"), struct.Struct(">Q")


def idstr(name: bytes) -> bytes:
    return bytes([len(name)]) + name


def entry(offset: int, flags: int, block: bytes | None, data: bytes) -> bytes:
    word = BE64.pack(offset | flags | (qs.F_CONTINUE if block is None else 0))
    return word + (idstr(block) if block is not None else b"") + data


def stream(with_config: bool = True) -> tuple[bytes, dict[int, bytes]]:
    """A stream as QEMU writes it: guest RAM "fcvm-ram" (16 KiB) and a ROM "rom" (4 KiB),
    pages and zero pages of both, sections with footers, then device state."""
    page_a, page_b, rom = b"A" * 4096, b"B" * 4096, b"R" * 4096
    out = BE32.pack(qs.MAGIC) + BE32.pack(qs.VERSION)
    if with_config:
        out += bytes([qs.CONFIGURATION]) + BE32.pack(7) + b"microvm"
        out += bytes([qs.SUBSECTION]) + idstr(b"configuration/capabilities") + BE32.pack(1)
        out += BE32.pack(1) + idstr(b"x-ignore-shared")
    # START: the block list, EOS, footer
    out += bytes([qs.SECTION_START]) + BE32.pack(2) + idstr(b"ram") + BE32.pack(0) + BE32.pack(4)
    out += BE64.pack((16384 + 4096) | qs.F_MEM_SIZE)
    out += idstr(b"fcvm-ram") + BE64.pack(16384) + idstr(b"rom") + BE64.pack(4096)
    out += BE64.pack(qs.F_EOS) + bytes([qs.FOOTER]) + BE32.pack(2)
    # PART: pages of RAM (one with CONTINUE), the ROM between them, a zero page
    out += bytes([qs.SECTION_PART]) + BE32.pack(2)
    out += entry(0, qs.F_PAGE, b"fcvm-ram", page_a)
    out += entry(8192, qs.F_PAGE, None, page_b)
    out += entry(0, qs.F_PAGE, b"rom", rom)
    out += entry(4096, qs.F_ZERO, b"fcvm-ram", b"\0")
    out += BE64.pack(qs.F_EOS) + bytes([qs.FOOTER]) + BE32.pack(2)
    # END, then device state copied as is
    out += bytes([qs.SECTION_END]) + BE32.pack(2) + BE64.pack(qs.F_EOS)
    out += bytes([qs.FOOTER]) + BE32.pack(2)
    out += b"\x04DEVICE-STATE-WE-DO-NOT-PARSE\x08"
    return out, {0: page_a, 8192: page_b}


def test_split_puts_guest_ram_in_the_file_and_the_rest_in_the_state(tmp_path: Path) -> None:
    data, pages = stream()
    mem = tmp_path / "memory"
    fd = os.open(mem, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16384)
    state = io.BytesIO()
    stats = qs.split(io.BytesIO(data), state, fd, b"fcvm-ram")
    os.close(fd)
    assert (stats.pages, stats.zero_pages) == (2, 1)
    raw = mem.read_bytes()
    assert raw[0:4096] == pages[0] and raw[8192:12288] == pages[8192]
    assert raw[4096:8192] == bytes(4096) and raw[12288:] == bytes(4096)
    out = state.getvalue()
    assert b"A" * 4096 not in out and b"B" * 4096 not in out  # RAM pages are gone...
    # ... the ROM's page stays, and names its block (no CONTINUE across a dropped entry)
    assert entry(0, qs.F_PAGE, b"rom", b"R" * 4096) in out
    assert out.endswith(b"\x04DEVICE-STATE-WE-DO-NOT-PARSE\x08")
    assert stats.state_bytes == len(out)
    # The output is itself a well-formed stream: splitting it again changes nothing.
    again = io.BytesIO()
    fd = os.open(tmp_path / "empty", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16384)
    assert qs.split(io.BytesIO(out), again, fd, b"fcvm-ram").pages == 0
    os.close(fd)
    assert again.getvalue() == out


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b[:50], "truncated"),
        (lambda b: b"XXXX" + b[4:], "not a QEMU migration stream"),
        (lambda b: b.replace(b"configuration/capabilities", b"configuration/surprises!!"),
         "unknown configuration subsection"),
        (lambda b: b.replace(b"\x03ram", b"\x03rum"), "unexpected iterative section"),
        (lambda b: b.replace(bytes([qs.FOOTER]) + BE32.pack(2), b"\x00" * 5, 1), "no footer"),
    ],
)  # fmt: skip
def test_split_refuses_what_it_does_not_understand(mangle: object, reason: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    data, _ = stream()
    fd = os.open(tmp_path / "m", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(qs.StreamFormatError, match=reason):
            qs.split(io.BytesIO(mangle(data)), io.BytesIO(), fd, b"fcvm-ram")  # type: ignore[operator]
    finally:
        os.close(fd)


# -- the store ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def write(name: str, kind: str = KIND_PRESTART, key: str = "", size: int = 1 << 20) -> SnapshotMeta:
    with store.writer(name) as w:
        snap = w.layout
        with open(snap.memory, "wb") as f:
            f.truncate(size)
            f.write(b"x" * 4096)
        snap.vmstate.write_bytes(os.urandom(1000))
        meta = SnapshotMeta(name=name, kind=kind, plan_key=key, vmm="qemu", vmm_version="7.2",
                            accel="tcg")  # fmt: skip
        w.commit(meta)
    return meta


EXPECT = {"vmm": "qemu", "vmm_version": "7.2", "accel": "tcg"}


def test_a_snapshot_appears_whole_or_not_at_all(base: Path) -> None:
    with store.writer("snap-1") as w:
        w.layout.memory.write_bytes(b"m")
        w.layout.vmstate.write_bytes(b"s")
        assert not layout("snap-1").dir.exists()  # nothing under the name yet
    assert not layout("snap-1").dir.exists()  # abandoned: gone
    assert not list((base / "snapshots").iterdir())
    write("snap-1")
    assert layout("snap-1").meta.is_file()


def test_lookup_validates_before_restoring(base: Path) -> None:
    key = "ab" * 32
    name = cache.name_of(key)
    write(name, key=key)
    entry = cache.lookup(KIND_PRESTART, key, EXPECT)
    assert entry is not None and entry.meta.plan_key == key
    entry.lease.release()
    assert cache.lookup(KIND_PRESTART, key, {**EXPECT, "vmm_version": "8.0"}) is None
    assert not layout(name).dir.exists()  # foreign: removed
    write(name, key=key)
    layout(name).vmstate.write_bytes(os.urandom(1000))  # same size, other bytes
    assert cache.lookup(KIND_PRESTART, key, EXPECT) is None
    write(name, key=key)
    os.truncate(layout(name).memory, 4096)
    assert cache.lookup(KIND_PRESTART, key, EXPECT) is None
    write(name, key=key)
    assert cache.lookup("startup", key, EXPECT) is None  # another kind under the name


def test_in_use_snapshots_are_never_removed(base: Path) -> None:
    write("held")
    lease = store.lease("held")
    assert lease is not None and store.in_use(layout("held"))
    with pytest.raises(store.SnapshotInUse, match="in use"):
        store.remove("held")
    assert cache.prune(max_bytes=0, kinds=(KIND_PRESTART,)) == []
    lease.release()
    assert not store.in_use(layout("held"))
    store.remove("held")
    with pytest.raises(SnapshotError, match="no snapshot named"):
        store.remove("held")


def test_a_lease_from_another_process_counts(base: Path) -> None:
    """flock across processes: another fcvm's VM holds it; when it dies, it is free."""
    write("shared")
    code = ("from fcvm.snapshot import store; import sys, time; l = store.lease('shared'); "
            "print('held', flush=True); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ})  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert store.in_use(layout("shared"))
    finally:
        child.kill()
        child.wait()
    assert not store.in_use(layout("shared"))  # kill -9 never leaves it "in use"


def test_one_writer_per_key(base: Path) -> None:
    key = "cd" * 32
    with cache.creator(key) as first:
        assert first is not None
        with cache.creator(key) as second:
            assert second is None  # another run is writing it: this one does not
    with cache.creator(key) as third:
        assert third is not None  # (nothing was committed: writable again)
    assert [p.name for p in paths.snapshots_dir().iterdir()] == []  # no lock file left


def cache_entries_and_a_named_one() -> None:
    """cache-0, -1, -2 last used 300, 200 and 100 s ago; named-one, a named snapshot."""
    for i, age in enumerate((300, 200, 100)):
        write(f"cache-{i}", size=8 << 20)
        past = time.time() - age
        layout(f"cache-{i}").last_used.touch()
        os.utime(layout(f"cache-{i}").last_used, (past, past))
    write("named-one", kind="named")


def test_prune_by_age_and_lru_size(base: Path) -> None:
    cache_entries_and_a_named_one()
    assert cache.prune(older_than=250) == ["cache-0"]
    one = store.size_on_disk(layout("cache-1").dir)
    assert cache.prune(max_bytes=one + 1) == ["cache-1"]  # least recently used first
    assert [e.layout.name for e in cache.listing()] == ["cache-2", "named-one"]


def test_an_entry_larger_than_the_bound_goes_alone(base: Path) -> None:
    """A bound smaller than a new entry: that entry is removed, not first every older
    one (they were all removed, for nothing)."""
    cache_entries_and_a_named_one()
    write("cache-big")
    with open(layout("cache-big").memory, "r+b") as f:
        f.write(os.urandom(4 << 20))
    small = sum(store.size_on_disk(layout(f"cache-{i}").dir) for i in range(3))
    assert cache.prune(max_bytes=small + (1 << 20)) == ["cache-big"]
    assert sorted(e.layout.name for e in cache.listing()) == [
        "cache-0", "cache-1", "cache-2", "named-one"]


def test_make_room_evicts_least_recently_used_cache_entries_only_if_that_suffices(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem of `capacity` bytes (what the snapshots occupy counts against it)."""
    capacity = 0

    def free_bytes(root: Path) -> int:
        return capacity - store.size_on_disk(root)

    assert cache.make_room(1)[0]  # a first snapshot: no snapshot directory yet
    monkeypatch.setattr(cache, "_free_bytes", free_bytes)
    cache_entries_and_a_named_one()
    held = store.lease("cache-0")  # in use: never evicted
    assert held is not None
    one = store.size_on_disk(layout("cache-1").dir)
    used = store.size_on_disk(base / "snapshots")
    capacity = used + (1 << 20)
    assert cache.make_room(1 << 20) == (True, 1 << 20)  # room already: nothing removed
    # Even removing every evictable entry (cache-1, cache-2) would not make enough.
    assert cache.make_room(2 * one + (2 << 20))[0] is False
    assert len(cache.listing()) == 4
    room, free = cache.make_room(one + (1 << 20))  # the oldest evictable one goes
    assert room and free >= one + (1 << 20)
    assert sorted(e.layout.name for e in cache.listing()) == ["cache-0", "cache-2", "named-one"]
    held.release()


def test_rm_names_what_it_removed_and_refuses_an_unknown_one(base: Path) -> None:
    write("keep")
    write("gone")
    rm = fcvm("snapshots", "rm", "gone", env={"FCVM_BASE_DIR": str(base)})
    assert (rm.returncode, rm.stdout) == (0, "removed gone\n"), rm.stderr
    assert [snap.name for snap, _ in list_snapshots()] == ["keep"]
    missing = fcvm("snapshots", "rm", "gone", env={"FCVM_BASE_DIR": str(base)})
    assert missing.returncode == 125 and len(missing.stderr.strip().splitlines()) == 1


def test_rm_removes_every_name_it_can(base: Path) -> None:
    """As podman rm: a name that is missing or in use is reported, the others go."""
    for name in ("busy", "old", "older"):
        write(name)
    held = store.lease("busy")
    assert held is not None
    rm = fcvm("snapshots", "rm", "nope", "old", "busy", "older", env={"FCVM_BASE_DIR": str(base)})
    assert rm.returncode == 125
    assert rm.stdout == "removed old\nremoved older\n"
    lines = rm.stderr.strip().splitlines()
    assert len(lines) == 2 and "'nope'" in lines[0]
    assert "'busy'" in lines[1] and "in use" in lines[1]
    assert [snap.name for snap, _ in list_snapshots()] == ["busy"]
    held.release()


def test_gc_removes_what_a_killed_writer_left(base: Path) -> None:
    code = ("from fcvm.snapshot import store; import time; w = store.Writer('half'); w.open(); "
            "print('writing', flush=True); time.sleep(60)")  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "writing\n"
    assert store.collect_garbage() == []  # still being written
    child.kill()
    child.wait()
    assert [n.startswith(".tmp-half-") for n in store.collect_garbage()] == [True]
    assert not list((base / "snapshots").iterdir())


@pytest.mark.parametrize("source_dir", ["same", "/dev/shm"])
def test_private_disk_copies_keep_holes(tmp_path: Path, source_dir: str,
                                        request: pytest.FixtureRequest) -> None:  # fmt: skip
    """Within one filesystem, and from tmpfs to this one (copy_file_range refuses to
    cross filesystems: EXDEV; the copy must not)."""
    if source_dir != "same":
        shm = Path(tempfile.mkdtemp(dir=source_dir))
        request.addfinalizer(lambda: shutil.rmtree(shm))
        if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip(f"{source_dir} is on the same filesystem as {tmp_path}")
    src = (tmp_path if source_dir == "same" else shm) / "disk"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"data" * 1024)
    dst = tmp_path / "copy"
    reflinked = store.copy_disk(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    if not reflinked:  # (ext4 here: a sparse copy)
        assert dst.stat().st_blocks * 512 < 1 << 20
    with open(dst, "r+b") as f:
        f.write(b"private")
    assert src.read_bytes()[:7] == bytes(7)


def test_cache_size_bound_is_configurable(monkeypatch: pytest.MonkeyPatch, base: Path) -> None:
    assert cache.limit_bytes() == cache.DEFAULT_LIMIT
    monkeypatch.setenv("FCVM_SNAPSHOT_CACHE_MAX", "512M")
    assert cache.limit_bytes() == 512 << 20
    monkeypatch.delenv("FCVM_SNAPSHOT_CACHE_MAX")
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.toml").write_text('snapshot_cache_max = "2G"\n')
    assert cache.limit_bytes() == 2 << 30
    from fcvm.errors import UsageError

    with pytest.raises(UsageError, match="malformed size"):
        cache.parse_size("lots")
    (base / "config.toml").write_text('snapshot_cache_max = "lots"\n')
    with pytest.raises(UsageError) as bad:
        cache.limit_bytes()
    assert str(bad.value) == (f"malformed snapshot_cache_max in {base / 'config.toml'}: 'lots' "
                              "(expected e.g. 500M or 10G)")  # fmt: skip
    monkeypatch.setenv("FCVM_SNAPSHOT_CACHE_MAX", "12 parsecs")
    with pytest.raises(UsageError, match="malformed FCVM_SNAPSHOT_CACHE_MAX: '12 parsecs'"):
        cache.limit_bytes()
    monkeypatch.delenv("FCVM_SNAPSHOT_CACHE_MAX")
    (base / "config.toml").write_text('snapshot_cache_max = "2G"\n')
    write("listed")
    (row,) = [e.to_json() for e in cache.listing()]
    assert json.loads(json.dumps(row))["name"] == "listed" and row["in_use"] is False
