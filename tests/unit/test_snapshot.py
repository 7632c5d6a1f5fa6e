"""Snapshot layout, handshake validation, working sets, uffd encodings, CLI errors.
No userfaultfd needed (tests/host/test_pageserver.py has the real thing)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fcvm import state
from fcvm.snapshot import layout, serving, uffd, workingset
from fcvm.snapshot.handshake import HandshakeError, Region, parse_regions, remap
from tests.conftest import dead_pid, fcvm

pytestmark = pytest.mark.unit
MiB = 1 << 20


def _region(base: int = 0x7F0000000000, size: int = MiB, offset: int = 0, **kw: int) -> dict:
    d = {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": 4096}
    d.update(kw)
    return d


def test_parse_regions_firecracker_payload() -> None:
    payload = json.dumps(
        [_region(size=2 * MiB, page_size_kib=4096), _region(base=0x7F1000000000, offset=2 * MiB)]
    ).encode()
    regions = parse_regions(payload, 3 * MiB)
    assert regions == [
        Region(0x7F0000000000, 2 * MiB, 0, 4096),
        Region(0x7F1000000000, MiB, 2 * MiB, 4096),
    ]


def test_parse_regions_page_size_fallbacks() -> None:
    r = _region()
    del r["page_size"]
    assert parse_regions(json.dumps([r]).encode(), MiB)[0].page_size == 4096
    r["page_size_kib"] = 4  # old Firecracker: really KiB
    assert parse_regions(json.dumps([r]).encode(), MiB)[0].page_size == 4096
    huge = _region(size=4 * MiB, page_size=2 * MiB, base=0x7F0000200000 * 2)
    assert parse_regions(json.dumps([huge]).encode(), 4 * MiB)[0].page_size == 2 * MiB


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"[{", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"{}", "non-empty JSON array"),
        (b"[]", "non-empty JSON array"),
        (b"[1]", "not a JSON object"),
        (json.dumps([{"size": 4096, "offset": 0}]).encode(), "base_host_virt_addr"),
        (json.dumps([_region(size=-1)]).encode(), "'size'"),
        (json.dumps([_region(size=True)]).encode(), "'size'"),
        (json.dumps([_region(size=0)]).encode(), "multiples of the page size"),
        (json.dumps([_region(base=0x7F0000000001)]).encode(), "multiples of the page size"),
        (json.dumps([_region(offset=100)]).encode(), "multiples of the page size"),
        (json.dumps([_region(page_size=3000)]).encode(), "unsupported page size"),
        (json.dumps([_region(page_size=1 << 30)]).encode(), "unsupported page size"),
        (json.dumps([_region(size=2 * MiB)]).encode(), "beyond the memory file"),
        (json.dumps([_region(offset=MiB)]).encode(), "beyond the memory file"),
        (json.dumps([_region(size=4096), _region(size=4096, offset=4096)]).encode(), "overlap"),
        (json.dumps([_region(), _region(base=0x7F1000000000)]).encode(), "overlap"),
    ],
)
def test_parse_regions_refuses(payload: bytes, needle: str) -> None:
    with pytest.raises(HandshakeError, match=needle):
        parse_regions(payload, MiB)


def test_remap_splits_regions() -> None:
    regions = [Region(0x10000, 0x4000, 0x1000, 4096)]
    moved = remap(regions, 0x11000, 0x90000, 0x1000)
    assert moved == [
        Region(0x10000, 0x1000, 0x1000, 4096),
        Region(0x12000, 0x2000, 0x3000, 4096),
        Region(0x90000, 0x1000, 0x2000, 4096),
    ]
    assert remap(regions, 0x50000, 0x60000, 0x1000) == regions


def test_ioctl_numbers_match_linux_headers() -> None:
    # Values of the _IOWR/_IOR macros in <linux/userfaultfd.h> on x86_64/arm64.
    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.UFFDIO_WAKE == 0x8010AA02
    assert uffd.UFFDIO_COPY == 0xC028AA03
    assert uffd.UFFDIO_ZEROPAGE == 0xC020AA04
    assert uffd.USERFAULTFD_IOC_NEW == 0xAA00


def test_msg_layout() -> None:
    """struct uffd_msg as the fault path unpacks it: (event, a, b, c)."""
    fault = struct.pack("=B7xQQQ", uffd.UFFD_EVENT_PAGEFAULT, 1, 0x7F0000001234, 42)
    remove = struct.pack("=B7xQQQ", uffd.UFFD_EVENT_REMOVE, 0x1000, 0x3000, 0)
    fork = struct.pack("=B7xIIQQ", uffd.UFFD_EVENT_FORK, 7, 0, 0, 0)
    data = fault + remove + fork
    assert len(data) == 3 * uffd.MSG_SIZE
    kind, flags, address, _ = uffd.MSG.unpack_from(data, 0)
    assert (kind, flags, address) == (uffd.UFFD_EVENT_PAGEFAULT, 1, 0x7F0000001234)
    assert flags == uffd.UFFD_PAGEFAULT_FLAG_WRITE
    assert uffd.MSG.unpack_from(data, uffd.MSG_SIZE)[:3] == (uffd.UFFD_EVENT_REMOVE, 0x1000, 0x3000)
    kind, child, _, _ = uffd.MSG.unpack_from(data, 2 * uffd.MSG_SIZE)
    assert kind == uffd.UFFD_EVENT_FORK and child & 0xFFFFFFFF == 7


def test_unavailable_message_says_what_to_change() -> None:
    import errno

    err = uffd.unavailable_error(
        {
            "syscall": OSError(errno.EPERM, "Operation not permitted"),
            "dev": OSError(errno.EACCES, "Permission denied"),
        }
    )
    text = err.line()
    assert "vm.unprivileged_userfaultfd" in text
    assert "/dev/userfaultfd" in text
    assert "UFFD_USER_MODE_ONLY" in text
    assert err.exit_code == 125


def test_layout_and_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path))
    snap = layout.layout("web-1.2")
    assert snap.dir == tmp_path / "snapshots" / "web-1.2"
    assert (snap.memory.name, snap.vmstate.name, snap.meta.name) == (
        "memory",
        "vmstate",
        "meta.json",
    )
    assert snap.disk("rootfs").name == "disk-rootfs"
    with pytest.raises(layout.SnapshotNotFound):
        layout.open_snapshot("web-1.2")
    meta = layout.SnapshotMeta(
        name="web-1.2", vmm="firecracker", memory_size=4096, disks={"rootfs": "disk-rootfs"}
    )
    layout.save_meta(snap, meta)
    assert layout.open_snapshot("web-1.2")[1] == meta
    (tmp_path / "snapshots" / "broken").mkdir()
    listed = {s.name: m for s, m in layout.list_snapshots()}
    assert listed == {"broken": None, "web-1.2": meta}


@pytest.mark.parametrize("name", ["", "..", "a/b", "-x", "x" * 65, "sp ace"])
def test_bad_snapshot_names(name: str) -> None:
    with pytest.raises(layout.SnapshotError):
        layout.layout(name)


def test_workingset_roundtrip_and_staleness(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    mem.write_bytes(b"\1" * 40960)
    ws = tmp_path / "workingset"
    pages = bytearray(10)
    pages[2] = pages[7] = 1
    workingset.save(ws, mem, pages)
    assert workingset.load(ws, mem) == pages
    assert workingset.count(workingset.union(pages, b"\1" + bytes(9))) == 3
    mem.write_bytes(b"\2" * 40960 * 2)  # snapshot re-created: the old set is ignored
    assert workingset.load(ws, mem) is None
    ws.write_bytes(b"garbage")
    assert workingset.load(ws, mem) is None


def test_cli_unknown_snapshot(tmp_path: Path) -> None:
    proc = fcvm("snapshot", "serve", "nope", env={"FCVM_BASE_DIR": str(tmp_path)})
    assert proc.returncode == 125
    assert proc.stderr.strip() == "fcvm: no snapshot named 'nope'"


@pytest.mark.parametrize("size", ["3", "0", "6"])
def test_cli_bad_block_size(tmp_path: Path, size: str) -> None:
    proc = fcvm(
        "snapshot", "serve", "x", "--block-size", size, env={"FCVM_BASE_DIR": str(tmp_path)}
    )
    assert proc.returncode == 125
    assert "--block-size" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_ls(tmp_path: Path) -> None:
    env = {"FCVM_BASE_DIR": str(tmp_path)}
    assert fcvm("snapshot", "ls", "--json", env=env, check=True).stdout.strip() == "[]"
    snap = tmp_path / "snapshots" / "s1"
    snap.mkdir(parents=True)
    (snap / "memory").write_bytes(bytes(8192))
    (snap / "meta.json").write_text(json.dumps({"name": "s1"}))
    rows = json.loads(fcvm("snapshot", "ls", "--json", env=env, check=True).stdout)
    assert [(r["name"], r["memory_bytes"], r["served_by_pid"]) for r in rows] == [
        ("s1", 8192, None)
    ]
    assert "s1" in fcvm("snapshot", "ls", env=env, check=True).stdout
    # A field of the wrong type (hand-edited) makes that one entry incomplete; the list
    # goes on (it failed as a whole: internal error: TypeError).
    (snap / "meta.json").write_text(json.dumps({"name": "s1", "created": "yesterday"}))
    listed = fcvm("snapshots", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:2] == ["s1", "incomplete"]


def _serve_record(sock: Path) -> state.VmRecord:
    """A page server's record as serve_snapshot makes it (owned by this process)."""
    rec = state.create(state.VmRecord(vm_id=state.new_vm_id(), name="serve-s1", kind="serve",
                                      extra={"snapshot": "s1", "socket": str(sock)}))  # fmt: skip
    state.add_reaper(rec, serving.reap_server_socket)
    return rec


def _killed(rec: state.VmRecord) -> None:
    """rec's owner is now a process that no longer exists (a server killed -9)."""
    rec.pid = dead_pid()
    state.write_record(rec)


def test_reaping_a_killed_server_spares_the_socket_of_the_one_serving_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed -9 leaves its record and socket; a new server for the snapshot
    replaces the socket at the same path before anything reaps the old record (`fcvm
    snapshot serve` does not reap first; bench/faults.py saw a clone's reap unlink the
    new server's socket). Reaping the old record must leave the new socket alone; once
    the new server is gone too, its socket is removed."""
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path))
    sock = serving.socket_path("s1")
    sock.parent.mkdir(parents=True)
    old = _serve_record(sock)
    sock.touch()  # (its socket, left by the kill)
    _killed(old)
    new = _serve_record(sock)  # the new server: its record, then its own socket there
    sock.unlink()
    sock.touch()
    assert [r.vm_id for r in state.reap_stale()] == [old.vm_id]
    assert sock.exists()  # still the new server's
    _killed(new)
    assert [r.vm_id for r in state.reap_stale()] == [new.vm_id]
    assert not sock.exists()


def test_a_page_server_is_not_taken_for_a_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:  # fmt: skip
    """fcvm exec / snapshot create naming a page server said 'still starting' or timed
    out on a control socket it does not have."""
    monkeypatch.setenv("FCVM_BASE_DIR", str(tmp_path))
    _serve_record(tmp_path / "s1.sock")
    env = {"FCVM_BASE_DIR": str(tmp_path)}
    for argv in (["exec", "--name", "serve-s1", "--", "true"],
                 ["snapshot", "create", "serve-s1", "--tag", "x"]):  # fmt: skip
        proc = fcvm(*argv, env=env)
        assert proc.returncode == 125
        assert proc.stderr == ("fcvm: 'serve-s1' is the page server of snapshot 's1', not a VM "
                               "(its clones are VMs)\n")  # fmt: skip
