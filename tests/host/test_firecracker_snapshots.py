"""Firecracker snapshots with real kernel features: the Uffd restore against the real
page server, and the Diff merge by reflink.

Firecracker cannot run here, so its side is played by the stand-in of
tests/unit/test_firecracker_vmm.py, whose Uffd load does what Firecracker does
(anonymous guest memory registered with a new userfaultfd, the regions JSON and the
uffd sent in one message, the socket kept open: tests/host/uffd_driver.Driver) to the
real `fcvm snapshot serve` process. The stand-in's guest then writes pages and its
snapshots read every page, so each page the server serves is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcvm import errors
from fcvm.snapshot import uffd
from fcvm.vmm import fc_diff
from fcvm.vmm.base import SnapshotFiles
from tests.unit.test_fc_diff import expected, page, write_pages
from tests.unit.test_firecracker_vmm import (
    FROM_UFFD,
    LOAD_FAILED,
    PAGE,
    MiB,
    Vms,
    connect,
    dumps,
    guest_writes,
    sha,
    standin_environment,
)

pytestmark = pytest.mark.host


@pytest.fixture
def vms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Vms]:
    v = Vms(tmp_path, standin_environment(tmp_path, monkeypatch))
    try:
        yield v
    finally:
        v.close()


def _uffd_ok() -> bool:
    try:
        uffd.probe()
    except uffd.UffdUnavailable:
        return False
    return True


needs_uffd = pytest.mark.skipif(not _uffd_ok(), reason="this user cannot create a userfaultfd")


@pytest.fixture
def served(vms: Vms) -> Iterator[tuple[SnapshotFiles, Path]]:
    """A booted stand-in VM's Full snapshot as BASE/snapshots/s0, served by the real
    `fcvm snapshot serve s0`: (its files, the server's socket)."""
    base = vms.tmp_path / "base"
    snap_dir = base / "snapshots" / "s0"
    snap_dir.mkdir(parents=True)
    a = vms.booted("a", mem_mib=16)
    a.pause()
    files = SnapshotFiles(snap_dir / "memory", snap_dir / "vmstate")
    a.save_snapshot(files)
    a.stop(timeout=2)
    (snap_dir / "meta.json").write_text(json.dumps({"name": "s0"}))
    env = {**os.environ, "FCVM_BASE_DIR": str(base)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcvm", "snapshot", "serve", "s0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield files, Path(json.loads(line)["socket"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pages(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + PAGE] for i in range(0, len(data), PAGE)]


@needs_uffd
def test_uffd_restore_through_the_real_page_server(
    vms: Vms, served: tuple[SnapshotFiles, Path]
) -> None:
    """restore() with files.page_server: PUT /snapshot/load with the Uffd backend; the
    page server accepts the stand-in's Firecracker handshake and serves every page:
    a Diff saved against S0 and merged onto it equals the guest's memory, and differs
    from S0 only where the guest wrote."""
    s0, sock = served
    b = vms.make("b", mem_mib=16)
    n = len(vms.requests())
    b.restore(SnapshotFiles(s0.memory, s0.state, page_server=sock))
    load = vms.requests(n)[1]
    assert load["body"]["mem_backend"] == {"backend_type": "Uffd", "backend_path": str(sock)}
    assert load["body"]["resume_vm"] is False and load["body"]["track_dirty_pages"] is True
    assert connect(b) == b"hello agent"  # resumed: the guest's writes faulted pages in
    b.pause()
    s1 = SnapshotFiles(vms.tmp_path / "s1-memory", vms.tmp_path / "s1-vmstate")
    b.save_snapshot(s1, base=s0)
    assert vms.requests()[-1]["body"]["snapshot_type"] == "Diff"
    assert sha(s1.memory) == sha(dumps(vms.memdump, "b")[-1])
    written = set(guest_writes(vms.record)[-1])
    changed = {i for i, (x, y) in enumerate(zip(_pages(s0.memory), _pages(s1.memory),
                                                strict=True)) if x != y}  # fmt: skip
    assert changed and changed <= written

    b.resume()
    b.pause()
    s2 = SnapshotFiles(vms.tmp_path / "s2-memory", vms.tmp_path / "s2-vmstate")
    b.save_snapshot(s2)  # Full: the stand-in reads all 16 MiB, every page served
    assert sha(s2.memory) == sha(dumps(vms.memdump, "b")[-1])
    unwritten = set(range(16 * MiB // PAGE)) - {p for run in guest_writes(vms.record)[1:]
                                                 for p in run}  # fmt: skip
    p0, p2 = _pages(s0.memory), _pages(s2.memory)
    assert all(p0[i] == p2[i] for i in unwritten)


@needs_uffd
def test_uffd_restore_without_a_page_server(vms: Vms) -> None:
    """No server on the socket: Firecracker's load fails connecting to it; one line
    quoting Firecracker, and the VMM is gone."""
    a = vms.booted("a")
    a.pause()
    snap = SnapshotFiles(vms.tmp_path / "m", vms.tmp_path / "v")
    a.save_snapshot(snap)
    a.stop(timeout=2)
    b = vms.make("b")
    missing = vms.tmp_path / "nobody.sock"
    with pytest.raises(errors.VmmUnavailable) as info:
        b.restore(SnapshotFiles(snap.memory, snap.state, page_server=missing))
    assert str(info.value) == (
        f"Firecracker could not load the snapshot: {LOAD_FAILED}{FROM_UFFD}"
        "Failed to connect to UDS Unix stream: No such file or directory (os error 2)"
    )
    assert b.poll() is not None


# -- the merge by reflink ------------------------------------------------------------


@pytest.fixture
def xfs() -> Iterator[Path]:
    """A small XFS filesystem on a loop file (reflink on), mounted for the test."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("needs root and mkfs.xfs")
    tmp = Path(tempfile.mkdtemp(prefix="fcvm-xfs-"))
    image, mnt = tmp / "fs.img", tmp / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 * MiB)
    try:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True,
                       capture_output=True)  # fmt: skip
        r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a loop XFS here: {r.stderr.decode().strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_merge_by_reflink_on_xfs(xfs: Path) -> None:
    size = 16 * MiB
    base_pages = {i: page(i) for i in range(0, size // PAGE, 3)}
    dirty = {i: page(70_000 + i) for i in range(500, 900, 7)} | {3: bytes(PAGE)}
    write_pages(xfs / "base", size, base_pages)
    write_pages(xfs / "diff", size, dirty)
    assert fc_diff.holes_unreliable(xfs) is None
    stats = fc_diff.merge(xfs / "base", xfs / "diff", xfs / "out")
    assert stats.reflinked
    assert (xfs / "out").read_bytes() == expected(size, base_pages, dirty)
    assert (xfs / "base").read_bytes() == expected(size, base_pages)
