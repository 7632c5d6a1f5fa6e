"""fc_diff: Firecracker Diff memory files merged onto their base, on real sparse files.

The diffs here are made the way Firecracker's `dump_dirty` makes them: a file of the
guest's size (ftruncate) with each dirty page written at its offset, zero pages
included; everything else is a hole. The filesystem under pytest's tmp_path is the
one checked (ext4 on our machines); /dev/shm adds tmpfs where it exists.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from fcvm.vmm import fc_diff
from fcvm.vmm.fc_diff import PAGE, MergeError

pytestmark = pytest.mark.unit

MiB = 1 << 20


def page(tag: int) -> bytes:
    return (tag.to_bytes(4, "little") * (PAGE // 4))[:PAGE]


def write_pages(path: Path, size: int, pages: dict[int, bytes]) -> None:
    """A sparse file of `size` bytes with `pages` (index -> 4 KiB) written, as
    Firecracker writes a memory file (set_len, then the pages at their offsets)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for index, data in sorted(pages.items()):
            assert len(data) == PAGE
            os.pwrite(fd, data, index * PAGE)
    finally:
        os.close(fd)


def expected(size: int, *layers: dict[int, bytes]) -> bytes:
    buf = bytearray(size)
    for layer in layers:
        for index, data in layer.items():
            buf[index * PAGE : (index + 1) * PAGE] = data
    return bytes(buf)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture(params=["tmp_path", "shm"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "tmp_path":
        return tmp_path
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = shm / f"fcvm-diff-test-{os.getpid()}-{random.randrange(1 << 30)}"
    d.mkdir()

    def remove() -> None:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()

    request.addfinalizer(remove)
    return d


def test_merge_overlays_exactly_the_dirty_pages(where: Path) -> None:
    size = 8 * MiB
    npages = size // PAGE
    base_pages = {i: page(1000 + i) for i in range(0, npages, 7)}  # some data, many holes
    rng = random.Random(5)
    dirty = {i: page(50_000 + i) for i in rng.sample(range(npages), 300)}
    dirty[0] = page(1)  # the first page
    dirty[npages - 1] = page(2)  # the last page: an extent ending at EOF
    dirty.update({i: page(3 + i) for i in range(100, 140)})  # one long run
    zeroed = [i for i in base_pages if i not in dirty][:5]
    for i in zeroed:  # pages the guest zeroed: written zeros must replace base's data
        dirty[i] = bytes(PAGE)
    base, diff, out = where / "base", where / "diff", where / "out"
    write_pages(base, size, base_pages)
    write_pages(diff, size, dirty)
    base_before, diff_before = base.read_bytes(), diff.read_bytes()

    stats = fc_diff.merge(base, diff, out)

    assert out.read_bytes() == expected(size, base_pages, dirty)
    assert base.read_bytes() == base_before and diff.read_bytes() == diff_before
    assert stats.data_bytes == len(dirty) * PAGE
    with open(diff, "rb") as f:
        assert stats.extents == len(fc_diff.data_extents(f.fileno()))
    assert stats.reflinked is False  # ext4/tmpfs: a sparse copy
    # The copy stayed sparse: base's holes that no dirty page covered are holes still.
    assert allocated(out) <= (len(base_pages) + len(dirty)) * PAGE + 64 * 1024


def test_merge_of_an_empty_diff_is_the_base(tmp_path: Path) -> None:
    base_pages = {3: page(3), 9: page(9)}
    write_pages(tmp_path / "base", MiB, base_pages)
    write_pages(tmp_path / "diff", MiB, {})
    stats = fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "base").read_bytes()
    assert stats.extents == 0 and stats.data_bytes == 0


def test_merge_replaces_an_existing_output(tmp_path: Path) -> None:
    write_pages(tmp_path / "base", MiB, {1: page(1)})
    write_pages(tmp_path / "diff", MiB, {2: page(2)})
    (tmp_path / "out").write_bytes(b"\xff" * (3 * MiB))  # stale, larger
    fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == expected(MiB, {1: page(1)}, {2: page(2)})


def test_merge_chains_layers_in_order(tmp_path: Path) -> None:
    """Layers merged in the order they were taken give the last state (the docs'
    base + layer 1 + layer 2 ...)."""
    size = 2 * MiB
    full = {i: page(i) for i in range(0, 512, 3)}
    layer1 = {5: page(500), 6: page(600), 9: bytes(PAGE)}
    layer2 = {6: page(6000), 300: page(3000)}
    write_pages(tmp_path / "m0", size, full)
    write_pages(tmp_path / "d1", size, layer1)
    write_pages(tmp_path / "d2", size, layer2)
    fc_diff.merge(tmp_path / "m0", tmp_path / "d1", tmp_path / "m1")
    fc_diff.merge(tmp_path / "m1", tmp_path / "d2", tmp_path / "m2")
    assert (tmp_path / "m2").read_bytes() == expected(size, full, layer1, layer2)


def test_size_mismatch_is_refused(tmp_path: Path) -> None:
    write_pages(tmp_path / "base", 2 * MiB, {})
    write_pages(tmp_path / "diff", MiB, {1: page(1)})
    with pytest.raises(MergeError, match="not a layer of that base"):
        fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partial_pages_are_refused(tmp_path: Path) -> None:
    (tmp_path / "base").write_bytes(bytes(PAGE + 10))
    (tmp_path / "diff").write_bytes(bytes(PAGE + 10))
    with pytest.raises(MergeError, match="not whole pages"):
        fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")


def _lseek_without_holes(real: object) -> object:
    """os.lseek of a filesystem with no SEEK_DATA/SEEK_HOLE support (the kernel's
    generic fallback: all data up to EOF)."""

    def lseek(fd: int, pos: int, how: int) -> int:
        size = os.fstat(fd).st_size
        if how == os.SEEK_DATA:
            if pos >= size:
                raise OSError(errno.ENXIO, "No such device or address")
            return pos
        if how == os.SEEK_HOLE:
            return size
        return real(fd, pos, how)  # type: ignore[operator,no-any-return]

    return lseek


def test_a_filesystem_that_reports_holes_as_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pages(tmp_path / "base", MiB, {1: page(1)})
    write_pages(tmp_path / "diff", MiB, {2: page(2)})
    monkeypatch.setattr(os, "lseek", _lseek_without_holes(os.lseek))
    with pytest.raises(MergeError, match="reports holes as data"):
        fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fc_diff._probed.clear()
    reason = fc_diff.holes_unreliable(tmp_path)
    fc_diff._probed.clear()
    assert reason is not None and "page granularity" in reason


def test_unaligned_extents_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pages(tmp_path / "base", MiB, {})
    write_pages(tmp_path / "diff", MiB, {2: page(2)})
    real = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        got = real(fd, pos, how)
        return got + 512 if how == os.SEEK_DATA else got  # extents off the page grid

    monkeypatch.setattr(os, "lseek", lseek)
    with pytest.raises(MergeError, match="not page-aligned"):
        fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")


def test_holes_probe_passes_here_and_is_cached(where: Path) -> None:
    fc_diff._probed.pop(os.stat(where).st_dev, None)
    assert fc_diff.holes_unreliable(where) is None
    assert not [p for p in where.iterdir() if p.name.startswith(".fcvm-holes-probe")]
    assert os.stat(where).st_dev in fc_diff._probed


def test_holes_probe_of_an_unwritable_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert "cannot probe" in (fc_diff.holes_unreliable(missing) or "")


def test_copy_falls_back_when_copy_file_range_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = MiB
    base_pages = {i: page(i) for i in range(0, 256, 2)}
    dirty = {i: page(900 + i) for i in range(10, 40)}
    write_pages(tmp_path / "base", size, base_pages)
    write_pages(tmp_path / "diff", size, dirty)

    def refuse(*args: object, **kw: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fc_diff, "_copy_file_range", refuse)
    fc_diff.merge(tmp_path / "base", tmp_path / "diff", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == expected(size, base_pages, dirty)
